// Evaluation modes beyond `standard` (being written). Stubs keep the driver compiling.
template <class D> static EvalResult eval_sliding(D, Model<D>&, const EvalData&, NllRecord* = nullptr) { fail("EVAL_MODE sliding: not implemented yet"); }
template <class D> static EvalResult eval_lora_ttt(D, Model<D>&, const EvalData&, NllRecord* = nullptr, std::vector<EvalResult>* = nullptr) { fail("EVAL_MODE lora_ttt: not implemented yet"); }
template <class D> static EvalResult eval_full_ttt(D, Model<D>&, const EvalData&, NllRecord* = nullptr) { fail("EVAL_MODE full_ttt: not implemented yet"); }
