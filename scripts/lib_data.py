"""Shared helpers for the data scripts (standard library only).

- shard headers of the challenge format ,
- SWORD zText/zCom module reader and OSIS-to-text conversion ,
  used by scripts/make_corpus to turn Debian's public-domain Bible texts and
  commentaries into plain-text documents.
"""
import array
import html
import os
import re
import struct
import sys
import zlib

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


# --- shards -------------------------------------------------------------------

def shard_token_count(path, expected_tokens=None):
    """Return N of a shard after checking magic, version and size == 1024 + 2N.

    Raises ValueError naming the file and what was expected vs found."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})")
    if len(head) < HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    magic, version, ntok = struct.unpack_from("<iii", head)
    if magic != SHARD_MAGIC:
        raise ValueError(f"{path}: magic {magic}, expected {SHARD_MAGIC}")
    if version != SHARD_VERSION:
        raise ValueError(f"{path}: version {version}, expected {SHARD_VERSION}")
    if ntok < 0 or size != HEADER_BYTES + 2 * ntok:
        raise ValueError(f"{path}: size {size} bytes, header says {ntok} tokens "
                         f"(expected {HEADER_BYTES + 2 * ntok} bytes)")
    if expected_tokens is not None and ntok != expected_tokens:
        raise ValueError(f"{path}: {ntok} tokens, expected {expected_tokens}")
    return ntok


def fnv1a64(data):
    """64-bit FNV-1a of bytes: the tokenizer checksum train_gpt and ./tokenize print."""
    h = 0xcbf29ce484222325
    for b in data:
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def write_manifest(dataset_dir, model_path, vocab_size, transform="none"):
    """dataset_dir/manifest.txt as ./tokenize shard writes it: train_gpt checks the tokenizer against it
    (and transform=caseops against CASEOPS_ENABLED)."""
    with open(model_path, "rb") as f:
        checksum = fnv1a64(f.read())
    text = (f"format=pgolf-shards-1\ntokenizer={os.path.basename(model_path)}\n"
            f"tokenizer_checksum={checksum:016x}\nvocab_size={vocab_size}\ntransform={transform}\n")
    path = os.path.join(dataset_dir, "manifest.txt")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
    return path


def read_shard_tokens(path):
    """Header-checked tokens of a shard as array('H')."""
    ntok = shard_token_count(path)
    tokens = array.array("H")
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        tokens.frombytes(f.read(2 * ntok))
    if sys.byteorder != "little":
        tokens.byteswap()
    return tokens


def write_shard(path, tokens):
    """Write array('H') tokens as a shard, atomically (path.tmp then rename). Used by tests."""
    header = array.array("i", [0] * HEADER_INTS)
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    body = array.array("H", tokens)
    if sys.byteorder != "little":
        header.byteswap()
        body.byteswap()
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(body.tobytes())
    os.replace(tmp, path)


# --- SWORD modules ------------------------------------------------------------
# A testament of a zText/zCom module is three files:
#   <t>.?zs  block index: 12-byte records (offset, compressed size, uncompressed size), little endian,
#            into <t>.?zz, each block one zlib stream;
#   <t>.?zv  verse index: one record per versification slot (module/testament/book/chapter headers
#            and verses): block number u32, start u32 inside the uncompressed block, size (u16 for
#            zText/zCom, u32 for zCom4/zText4).
# Entries are read through the verse index rather than by concatenating blocks, because adjacent
# verses are stored without a separator ('teeth.”Jesus said' in the WEB); commentaries link several
# verses to one entry, so each (block, start, size) is taken once.

def _read_blocks(zs_path, zz_path):
    index = open(zs_path, "rb").read()
    data = open(zz_path, "rb").read()
    if len(index) % 12:
        raise ValueError(f"{zs_path}: {len(index)} bytes, not a multiple of 12-byte block records")
    blocks = []
    for pos in range(0, len(index), 12):
        offset, csize, usize = struct.unpack_from("<III", index, pos)
        if csize == 0:
            blocks.append(b"")
            continue
        if offset + csize > len(data):
            raise ValueError(f"{zs_path}: block {pos // 12} ends at {offset + csize}, "
                             f"past the end of {zz_path} ({len(data)} bytes)")
        raw = zlib.decompress(data[offset:offset + csize])
        if len(raw) != usize:
            raise ValueError(f"{zz_path}: block {pos // 12} inflates to {len(raw)} bytes, "
                             f"index says {usize}")
        blocks.append(raw)
    return blocks


def _verse_records(zv_path, blocks):
    """Parse the verse index; the record size (10 or 12) is the one whose records all fit."""
    index = open(zv_path, "rb").read()
    for rec, fmt in ((10, "<IIH"), (12, "<III")):
        if len(index) % rec:
            continue
        records = [struct.unpack_from(fmt, index, pos) for pos in range(0, len(index), rec)]
        if all(size == 0 or (b < len(blocks) and start + size <= len(blocks[b]))
               for b, start, size in records):
            return records
    raise ValueError(f"{zv_path}: not a verse index of 10- or 12-byte records "
                     f"matching its {len(blocks)} blocks")


def sword_entries(module_dir):
    """Entries (OSIS XML strings) of a SWORD zText/zCom module, in canonical order, each once."""
    entries = []
    for testament in ("ot", "nt"):
        for letter in "bcv":  # book-, chapter- or verse-blocked
            zs = os.path.join(module_dir, f"{testament}.{letter}zs")
            if os.path.exists(zs):
                break
        else:
            continue
        if os.path.getsize(zs) == 0:
            continue
        blocks = _read_blocks(zs, zs[:-1] + "z")
        seen = set()
        for b, start, size in _verse_records(zs[:-1] + "v", blocks):
            if size == 0 or (b, start, size) in seen:
                continue
            seen.add((b, start, size))
            entries.append(blocks[b][start:start + size].decode("utf-8", errors="replace"))
    if not entries:
        raise ValueError(f"{module_dir}: no SWORD text found (expected ot/nt .?zs/.?zv/.?zz files)")
    return entries


# --- OSIS to text -------------------------------------------------------------

_NOTE = re.compile(r"<note\b[^>]*/>|<note\b.*?</note>", re.S)
# Tags that end a line of text; everything else (w, hi, reference, transChange, q, divineName, ...)
# is deleted without inserting a space, or punctuation would come loose ("Christ ,").
_BLOCK_TAG = re.compile(r"</?(?:div|p|lb|l|lg|title|chapter|item|list|row|table|speaker|head)\b[^>]*>")
_CELL_END = re.compile(r"</cell\s*>")
_ANY_TAG = re.compile(r"<[^>]*>")
_SPACES = re.compile(r"[ \t\r\f\v\u00a0]+")
# Document starts: a chapter or a book (sID = start milestone).
_DOC_START = re.compile(r'(?=<chapter\b[^>]*\bsID=)|(?=<div\b(?=[^>]*\btype="book")(?=[^>]*\bsID=)[^>]*>)')


def osis_to_text(xml):
    """Plain text lines of an OSIS fragment: no empty lines, single spaces."""
    s = _NOTE.sub("", xml)
    s = _BLOCK_TAG.sub("\n", s)
    s = _CELL_END.sub(" ", s)
    s = _ANY_TAG.sub("", s)
    s = html.unescape(s)
    lines = (_SPACES.sub(" ", line).strip() for line in s.split("\n"))
    return "\n".join(line for line in lines if line)


def _split_long(text, max_chars):
    """Cut a long document at line boundaries into near-equal parts of about max_chars or less."""
    if len(text) <= max_chars:
        return [text]
    parts_wanted = -(-len(text) // max_chars)
    target = len(text) / parts_wanted
    parts, cur, cur_len = [], [], 0
    for line in text.split("\n"):
        cur.append(line)
        cur_len += len(line) + 1
        if cur_len >= target:
            parts.append("\n".join(cur))
            cur, cur_len = [], 0
    if cur:
        if parts and cur_len < target / 2:  # a short tail joins the part before it
            parts[-1] += "\n" + "\n".join(cur)
        else:
            parts.append("\n".join(cur))
    return parts


def sword_documents(module_dir, min_chars=400, max_chars=4000):
    """Documents of a module: one per chapter (book titles and short chapters join the next one),
    long ones (a Treasury of David psalm is ~80 KB) cut at line boundaries.

    Verses of a Bible text run on within a paragraph (joined by a space); a commentary's entries
    are separate notes (joined by a line break)."""
    commentary = "/comments/" in os.path.abspath(module_dir) + "/"
    xml = ("\n" if commentary else " ").join(sword_entries(module_dir))
    docs, pending = [], ""
    for piece in _DOC_START.split(xml):
        text = osis_to_text(piece)
        if not text:
            continue
        pending = pending + "\n" + text if pending else text
        if len(pending) >= min_chars:
            docs.extend(_split_long(pending, max_chars))
            pending = ""
    if pending:
        if docs and len(docs[-1]) + len(pending) <= max_chars:
            docs[-1] += "\n" + pending
        else:
            docs.append(pending)
    return docs
