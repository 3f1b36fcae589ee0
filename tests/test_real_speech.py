"""The recorded-speech splits in data/real/ and the pure helpers of scripts/build_real_speech.py."""

from __future__ import annotations

import csv
import importlib.util
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from whisper_obs_pruning.speech.datasets import load_utterances

REPO = Path(__file__).resolve().parents[1]
REAL = REPO / "data" / "real"


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "build_real_speech", REPO / "scripts" / "build_real_speech.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("build_real_speech", module)  # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


brs = _load_script()


def _rows(split: str) -> list[dict]:
    with open(REAL / split / "metadata.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------ committed splits


@pytest.fixture(scope="module")
def evaluation():
    return load_utterances(str(REAL), "evaluation")


@pytest.fixture(scope="module")
def calibration():
    return load_utterances(str(REAL), "calibration")


def test_evaluation_split_size(evaluation):
    utts = evaluation.utterances
    assert not evaluation.skipped
    assert len(utts) >= 300
    assert sum(brs.word_count(u.text) for u in utts) >= 3000
    speakers = {r["speaker"] for r in _rows("evaluation")}
    assert len(speakers) >= 10
    assert all(brs.MIN_SECONDS - 0.01 <= u.duration <= brs.MAX_SECONDS + 0.01 for u in utts)


def test_calibration_split_size(calibration):
    utts = calibration.utterances
    assert not calibration.skipped
    assert 90 <= len(utts) <= 110
    assert all(brs.CAL_MIN_SECONDS - 0.01 <= u.duration <= brs.CAL_MAX_SECONDS + 0.01 for u in utts)


def test_columns_and_audio_format():
    for split in ("evaluation", "calibration"):
        rows = _rows(split)
        assert list(rows[0])[:4] == ["file_name", "transcription", "speaker", "source"]
        for row in rows[:: max(1, len(rows) // 25)]:
            info = sf.info(REAL / split / row["file_name"])
            assert (info.samplerate, info.channels, info.format) == (16000, 1, "FLAC")
            assert abs(info.frames / 16000 - float(row["duration_s"])) < 0.02
            assert row["transcription"].strip() and row["speaker"].strip()


def test_splits_share_no_line_and_no_speaker():
    ev, cal = _rows("evaluation"), _rows("calibration")
    ev_lines = {o for r in ev for o in r["origin"].split("+")}
    cal_lines = {o for r in cal for o in r["origin"].split("+")}
    assert not ev_lines & cal_lines
    assert len(ev_lines) == len(ev)  # every evaluation clip is one original line
    assert not {r["transcription"] for r in ev} & {r["transcription"] for r in cal}
    assert not {r["speaker"] for r in ev} & {r["speaker"] for r in cal}


def test_size_budget_and_stats():
    total = sum(p.stat().st_size for p in REAL.rglob("*.flac"))
    assert total < 27e6
    stats = json.loads((REAL / "build_stats.json").read_text())
    for split in ("evaluation", "calibration"):
        assert stats["splits"][split]["clips"] == len(_rows(split))
        assert 0 < stats["splits"][split]["dense_tiny_en"]["wer"] < 1
    assert (REAL / "ATTRIBUTION.md").read_text().count("odified") >= 1


# ------------------------------------------------------------------------------ script helpers


def test_split_segments_follows_talk_speak():
    # leading command: empty segment 0, text is segment 1 (voice file ...2)
    assert brs.split_segments("*FRHey, over here!*01") == [(0, ""), (1, "Hey, over here!")]
    # *GD/*GM play nothing but still advance the index; *XY takes 11 more characters
    assert brs.split_segments("One.*GDTwo.*XY00(237,112)Three") == [
        (1, "Two."),
        (2, "Three"),
    ]
    assert brs.split_segments("No command at all") == [(0, "No command at all")]
    assert brs.split_segments("A.*15B.*03") == [(0, "A."), (1, "B.")]


def test_clean_text_and_sentence_case():
    assert brs.clean_text('  "Hello   there ,  King."  ') == "Hello there, King."
    assert brs.clean_text("Wait.......what?") == "Wait...what?"
    assert brs.clean_text("caf\xe9 time") == "caf time"
    assert brs.sentence_case("HI THERE. I'M IGOR, I THINK") == "Hi there. I'm Igor, I think"
    assert brs.word_count("I don't know, Joe.") == 4
    assert not brs.is_dialogue("Do you want to RESTART (Y/N)?")
    assert not brs.is_dialogue("c2c.CUT")
    assert not brs.is_dialogue("...!")
    assert brs.is_dialogue("It's open")


def _queen_archive(files: dict[str, bytes]) -> bytes:
    header = b"QTBL" + b"CEM10\0" + b"\0\0" + b"\x01" + struct.pack(">H", len(files))
    offset = len(header) + 21 * len(files)
    table, blobs = b"", b""
    for name, blob in files.items():
        table += name.encode().ljust(12, b"\0") + struct.pack(">BII", 1, offset, len(blob))
        offset += len(blob)
        blobs += blob
    return header + table + blobs


def test_parse_queen_table():
    archive = _queen_archive({"A.DOG": b"dialogue", "020001P2.SB": b"\xff\xe3mp3"})
    table = brs.parse_queen_table(archive)
    assert set(table) == {"A.DOG", "020001P2.SB"}
    off, size = table["020001P2.SB"]
    assert archive[off : off + size] == b"\xff\xe3mp3"
    with pytest.raises(ValueError):
        brs.parse_queen_table(b"NOPE" + archive[4:])


def _dog_string(text: str, align: int, at: int) -> bytes:
    raw = bytes([len(text)]) + text.encode()
    end = (at + len(raw) + align - 1) & ~(align - 1)
    return raw.ljust(end - at, b"\0")


def test_parse_dog_voice_prefixes():
    level_max, talk_key = 1, 7
    joe_ptr = 32 + level_max * 96
    body = bytearray(joe_ptr)
    joe = bytearray()
    for ident, text in ((0, "Hello there.*01"), (0x1A, "Who are you?")):
        joe += struct.pack(">hh", 0, ident)
        joe += _dog_string(text, 4, joe_ptr + len(joe))
    person1 = joe_ptr + len(joe)
    person = bytearray(struct.pack(">hh", 0, 0x1A))
    person += _dog_string("I'm the chef.*03Go away!", 4, person1 + len(person))
    person2 = person1 + len(person)
    again = _dog_string("You again?", 2, person2)
    again += _dog_string("Yes, me.", 2, person2 + len(again))
    struct.pack_into(">5h", body, 0, -level_max, 3, talk_key, 2, 1)
    struct.pack_into(">3H", body, 22, person1, 0, person2)
    raw = b"\0" * brs.DOG_HEADER_SIZE + bytes(body) + joe + person + again
    lines = brs.parse_dog(raw)
    assert ("07001AP", "P", "I'm the chef.*03Go away!") in lines
    assert ("07SSSSJ", "J", "Hello there.*01") in lines
    assert ("07001AJ", "J", "Who are you?") in lines
    assert ("07XXXXP", "P", "You again?") in lines
    assert ("07XXXXJ", "J", "Yes, me.") in lines


def test_parse_credits_and_unique_actors():
    crd = (
        ".i 15\r\nVoice Artists\r\n.i 30\r\nAnn Actor\r\n.i 222\r\n    Joe\r\n     Klunk\r\n"
        ".i 30\r\nBob Actor\r\n.i 222\r\n    Klunk\r\n.p 5\r\n.i 15\r\nProgramming\r\n"
        ".i 30\r\nSomeone\r\n"
    )
    credits = brs.parse_credits(crd)
    assert credits == {"Ann Actor": ["Joe", "Klunk"], "Bob Actor": ["Klunk"]}
    assert brs.character_actors(credits) == {"Joe": "Ann Actor"}  # Klunk is ambiguous


def _texts_block(texts: list[str]) -> bytes:
    """One language block of a drascula.dat text table: entry 0 is empty, 4-byte alignment,
    the distance from each entry to the next stored in the 2 bytes just before the entry."""
    block = bytearray(b"\0\0\0\0")
    for text in ["", *texts]:
        raw = text.encode() + b"\0"
        size = (len(raw) + 2 + 3) // 4 * 4
        struct.pack_into(">H", block, len(block) - 2, size)
        block += raw.ljust(size, b"\0")
    return bytes(block)


def test_read_drascula_texts():
    data = bytearray(b"DRASCULA\x06")
    data += struct.pack(">H", 1) + b"A\0\x06\0"  # one charMap record
    data += struct.pack(">H", 0) * 12  # the other pre-text tables, empty
    data += struct.pack(">H", 2)  # two languages
    n_tables = len(brs.DRASCULA_TABLES) + brs.DRASCULA_OTHER_TABLES
    for t in range(n_tables):
        english = _texts_block([f"HELLO {t}", "SECOND LINE"])
        other = _texts_block(["HOLA", "OTRA"])
        data += struct.pack(">H", 3)
        data += struct.pack(">H", len(english)) + english
        data += struct.pack(">H", len(other)) + other
    tables = brs.read_drascula_texts(bytes(data))
    assert len(tables) == n_tables
    assert tables[0] == ["", "HELLO 0", "SECOND LINE"]
    assert tables[3][1] == "HELLO 3"


def test_mispair_rule_and_quantize():
    assert brs.is_mispaired(1.0, 0.2)
    assert not brs.is_mispaired(1.0, 0.7)  # many word errors but the same sounds: a hard clip
    assert not brs.is_mispaired(0.5, 0.1)
    q = brs.quantize(np.array([0.0, 0.5, -1.0, 1.0, 1e-5], dtype=np.float32))
    step = 2 ** (16 - brs.STORED_BITS)
    assert q.dtype == np.int16 and np.all(q % step == 0)
    assert q[2] == -32768 and q[3] > 32000 and q[4] == 0
