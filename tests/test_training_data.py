"""Data preparation over the 212 shared Friends transcripts (about 4 s)."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

from training.prepare_data import build_dataset, build_summary
from training.text import has_mojibake
from training.transcripts import read_html_folder

MAIN_CAST = {"Rachel", "Ross", "Chandler", "Monica", "Joey", "Phoebe"}
# Leftovers that clean text must not contain: tags, entities, direction brackets.
_LEFTOVER = re.compile(r"<[^>]*>|&[#\w]+;|[()\[\]{}<>]")


@pytest.fixture(scope="module")
def transcripts(shared_dir: Path):
    folder = shared_dir / "data" / "friends-transcripts"
    episodes = read_html_folder(folder)
    dataset = build_dataset(episodes, context_lines=6, valid_share=0.1, seed=0)
    summary = build_summary(episodes, dataset, config={})
    return episodes, dataset, summary


def all_texts(dataset):
    for record in dataset.train + dataset.valid:
        yield record["reply"]
        for line in record["context"]:
            yield line["text"]


def test_every_file_yields_joey_lines(transcripts):
    episodes, _, summary = transcripts
    assert len(episodes) == 212
    assert summary["episodes_without_lines"] == []
    assert summary["episodes_without_joey"] == []
    assert min(episode.joey_line_count() for episode in episodes) >= 5


def test_counts_in_plausible_ranges(transcripts):
    _, dataset, summary = transcripts
    assert 45_000 <= summary["lines"] <= 70_000
    assert 6_000 <= summary["joey_lines"] <= 9_000
    assert 2_000 <= summary["scenes"] <= 4_000
    assert len(dataset.train) >= 5_000
    assert 0.05 <= len(dataset.valid) / (len(dataset.train) + len(dataset.valid)) <= 0.2
    # Dropped text is mostly titles and credits; unattributed dialogue stays rare.
    assert summary["dropped_lines"].get("text without a speaker", 0) < 0.005 * summary["lines"]


def test_main_cast_are_top_speakers(transcripts):
    _, _, summary = transcripts
    top_six = list(summary["speakers"])[:6]
    assert set(top_six) == MAIN_CAST
    assert all(summary["speakers"][name] > 5_000 for name in MAIN_CAST)


def test_some_files_needed_cp1252(transcripts):
    _, _, summary = transcripts
    assert "0905.html" in summary["decoded_as_cp1252"]
    assert "0909.html" in summary["decoded_as_cp1252"]


def test_text_is_clean_unicode(transcripts):
    _, dataset, _ = transcripts
    problems: Counter[str] = Counter()
    for text in all_texts(dataset):
        if not text or text != text.strip() or "  " in text:
            problems["whitespace"] += 1
        if "\ufffd" in text or any(unicodedata.category(char) == "Cc" for char in text):
            problems["replacement or control character"] += 1
        if has_mojibake(text):
            problems["mojibake"] += 1
        if _LEFTOVER.search(text):
            problems["tag, entity or bracket"] += 1
    assert problems == Counter()


def test_curly_quotes_decoded(transcripts):
    _, dataset, _ = transcripts
    texts = list(all_texts(dataset))
    assert sum("’" in text for text in texts) > 1_000


def test_splits_share_no_episode(transcripts):
    _, dataset, _ = transcripts
    train_groups = {record["episode"][:4] for record in dataset.train}
    valid_groups = {record["episode"][:4] for record in dataset.valid}
    assert train_groups.isdisjoint(valid_groups)


def test_record_ids_unique(transcripts):
    _, dataset, _ = transcripts
    ids = [record["id"] for record in dataset.train + dataset.valid]
    assert len(ids) == len(set(ids))
