"""Build Joey's dialogue examples from Friends transcripts.

Reads a folder of episode HTML files, or a CSV/TSV of lines, and writes ``train.jsonl``,
``valid.jsonl`` and ``summary.json`` to the output folder. Train and validation are split by
episode. Exits with status 1 when a file yields no lines or no line of Joey, after writing
everything else, so that a broken file is never skipped silently.

    python -m training.prepare_data --input ../shared/data/friends-transcripts --output-dir data
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.examples import (
    DEFAULT_CONTEXT_LINES,
    REASON_DUPLICATE,
    REASON_GROUP,
    Candidate,
    iter_joey_lines,
    unusable_reason,
)
from training.paths import default_transcripts_dir
from training.transcripts import JOEY, Episode, read_html_folder, read_table

logger = logging.getLogger(__name__)

DEFAULT_VALID_SHARE = 0.1
_EPISODE_NUMBER = re.compile(r"^\d{4}")
_NON_ALPHANUMERIC = re.compile(r"[\W_]+")


@dataclass
class Dataset:
    """Examples per split and every count that the summary reports."""

    train: list[dict[str, Any]] = field(default_factory=list)
    valid: list[dict[str, Any]] = field(default_factory=list)
    dropped_joey_lines: Counter[str] = field(default_factory=Counter)
    examples_per_episode: Counter[str] = field(default_factory=Counter)
    valid_groups: list[str] = field(default_factory=list)
    train_groups: list[str] = field(default_factory=list)


# --- splitting --------------------------------------------------------------------------------


def episode_group(episode_id: str) -> str:
    """Return the split group of an episode: its SSEE number when it starts with one.

    Two versions of one episode ("0423" and "0423uncut") share most lines, so they must land
    in the same split.
    """
    match = _EPISODE_NUMBER.match(episode_id)
    return match.group(0) if match else episode_id


def choose_valid_groups(groups: Sequence[str], valid_share: float, seed: int) -> set[str]:
    """Pick ``round(share * len(groups))`` groups, at least one, by a seeded hash of each name.

    The choice of a group depends only on its name and the seed, so adding an episode moves
    few others between the splits. A share of 0 keeps everything in training.
    """
    unique = sorted(set(groups))
    if valid_share <= 0 or len(unique) < 2:
        return set()
    count = min(len(unique) - 1, max(1, round(valid_share * len(unique))))
    ranked = sorted(unique, key=lambda name: hashlib.sha256(f"{seed}:{name}".encode()).hexdigest())
    return set(ranked[:count])


# --- building examples ------------------------------------------------------------------------


def build_dataset(
    episodes: Sequence[Episode], context_lines: int, valid_share: float, seed: int
) -> Dataset:
    """Turn episodes into records, drop unusable and duplicate ones, and split by episode."""
    dataset = Dataset()
    groups = [episode_group(episode.episode_id) for episode in episodes]
    valid_groups = choose_valid_groups(groups, valid_share, seed)
    dataset.valid_groups = sorted(valid_groups)
    dataset.train_groups = sorted(set(groups) - valid_groups)

    seen: set[tuple[str, str, str]] = set()
    for episode, group in zip(episodes, groups, strict=True):
        for item in iter_joey_lines(episode, context_lines):
            if isinstance(item, str):
                dataset.dropped_joey_lines[item] += 1
                continue
            record = _usable_record(item, group, seen, dataset.dropped_joey_lines)
            if record is None:
                continue
            split = dataset.valid if group in valid_groups else dataset.train
            split.append(record)
            dataset.examples_per_episode[episode.episode_id] += 1
    return dataset


def _usable_record(
    candidate: Candidate, group: str, seen: set[tuple[str, str, str]], dropped: Counter[str]
) -> dict[str, Any] | None:
    record = candidate.to_record()
    reason = unusable_reason(record)
    if reason:
        dropped[reason] += 1
        return None
    # The same reply after the same line within one episode group is a second version
    # of that episode (an uncut cut), not new data. Transcribers of the two versions differ
    # in quote marks and punctuation, so the comparison ignores both.
    key = (group, _comparable(candidate.context[-1].text), _comparable(candidate.reply))
    if key in seen:
        dropped[REASON_DUPLICATE] += 1
        return None
    seen.add(key)
    return record


def _comparable(text: str) -> str:
    return _NON_ALPHANUMERIC.sub(" ", text.lower()).strip()


# --- reading and writing ----------------------------------------------------------------------


def read_episodes(source: Path) -> list[Episode]:
    """Read a folder of HTML episodes, or a ``.csv``/``.tsv`` file of lines."""
    if source.is_dir():
        return read_html_folder(source)
    if source.is_file() and source.suffix.lower() in {".csv", ".tsv"}:
        return read_table(source)
    if source.is_file():
        raise ValueError(f"unsupported input file {source}: expected a .csv or .tsv file")
    raise FileNotFoundError(f"input not found: {source}")


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL file of records, naming the line of any invalid JSON."""
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: invalid JSON: {exc}") from exc
    return records


def build_summary(
    episodes: Sequence[Episode], dataset: Dataset, config: dict[str, Any]
) -> dict[str, Any]:
    dropped_lines: Counter[str] = Counter()
    for episode in episodes:
        dropped_lines.update(episode.dropped)
    group_lines_with_joey = dataset.dropped_joey_lines.get(REASON_GROUP, 0)
    return {
        "config": config,
        "files": len({episode.source for episode in episodes}),
        "episodes": len(episodes),
        "scenes": sum(len(episode.scenes) for episode in episodes),
        "lines": sum(episode.line_count for episode in episodes),
        "joey_lines": sum(episode.joey_line_count() for episode in episodes),
        "joey_group_lines": group_lines_with_joey,
        "examples": {"train": len(dataset.train), "valid": len(dataset.valid)},
        "split_groups": {"train": dataset.train_groups, "valid": dataset.valid_groups},
        "dropped_lines": dict(dropped_lines.most_common()),
        "joey_lines_without_example": dict(dataset.dropped_joey_lines.most_common()),
        "episodes_without_lines": [e.episode_id for e in episodes if not e.line_count],
        "episodes_without_joey": [e.episode_id for e in episodes if not e.joey_line_count()],
        "decoded_as_cp1252": [e.source for e in episodes if e.warnings],
        "speakers": _speaker_counts(episodes),
        "per_episode": [
            {
                "episode": episode.episode_id,
                "source": episode.source,
                "scenes": len(episode.scenes),
                "lines": episode.line_count,
                "joey_lines": episode.joey_line_count(),
                "examples": dataset.examples_per_episode[episode.episode_id],
                "dropped_lines": dict(episode.dropped),
                "warnings": episode.warnings,
            }
            for episode in episodes
        ],
    }


def _speaker_counts(episodes: Sequence[Episode], top: int = 40) -> dict[str, int]:
    counts: Counter[str] = Counter(
        line.speaker for episode in episodes for scene in episode.scenes for line in scene
    )
    return dict(counts.most_common(top))


def format_summary(summary: dict[str, Any]) -> str:
    """Render the summary as the lines that the command prints."""
    examples = summary["examples"]
    groups = summary["split_groups"]
    lines = [
        f"episodes: {summary['episodes']} from {summary['files']} files, "
        f"{summary['scenes']} scenes",
        f"lines: {summary['lines']}, of which Joey alone: {summary['joey_lines']}, "
        f"Joey in group lines: {summary['joey_group_lines']}",
        f"examples written: {examples['train'] + examples['valid']} "
        f"(train {examples['train']} from {len(groups['train'])} episodes, "
        f"valid {examples['valid']} from {len(groups['valid'])} episodes)",
        "lines dropped by reason:",
    ]
    lines += _indented(summary["dropped_lines"])
    lines.append("Joey lines without an example, by reason:")
    lines += _indented(summary["joey_lines_without_example"])
    if summary["decoded_as_cp1252"]:
        lines.append(f"decoded as cp1252 (not valid UTF-8): {len(summary['decoded_as_cp1252'])}")
    return "\n".join(lines)


def _indented(counts: dict[str, int]) -> list[str]:
    return [f"  {reason}: {count}" for reason, count in counts.items()] or ["  none"]


# --- command line -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.prepare_data",
        description="Build Joey's dialogue examples (JSONL) from Friends transcripts.",
    )
    parser.add_argument(
        "--input",
        type=Path,
        default=default_transcripts_dir(),
        help=(
            "Folder of episode HTML files, or a .csv/.tsv file with season, episode, scene, "
            "speaker and text columns (default: %(default)s)."
        ),
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=Path("data"),
        help="Folder for train.jsonl, valid.jsonl and summary.json (default: %(default)s).",
    )
    parser.add_argument(
        "--context-lines",
        type=int,
        default=DEFAULT_CONTEXT_LINES,
        help="Maximum number of earlier lines of the scene kept as context (default: %(default)s).",
    )
    parser.add_argument(
        "--valid-share",
        type=float,
        default=DEFAULT_VALID_SHARE,
        help="Share of episodes held out for validation, 0 to 0.5 (default: %(default)s).",
    )
    parser.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="Seed of the episode split; the same seed gives the same split (default: 0).",
    )
    parser.add_argument(
        "--allow-missing-joey",
        action="store_true",
        help="Exit with status 0 even when some file yields no line of Joey.",
    )
    parser.add_argument("--verbose", action="store_true", help="Log per-file details.")
    args = parser.parse_args(argv)
    if args.context_lines < 1:
        parser.error(f"--context-lines must be at least 1, got {args.context_lines}")
    if not 0 <= args.valid_share <= 0.5:
        parser.error(f"--valid-share must be between 0 and 0.5, got {args.valid_share}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        episodes = read_episodes(args.input)
    except (OSError, ValueError) as exc:
        logger.error("cannot read the transcripts: %s", exc)
        return 2
    if not episodes:
        logger.error(
            "no episodes found in %s: expected *.html files or a .csv/.tsv file", args.input
        )
        return 2
    for episode in episodes:
        for warning in episode.warnings:
            logger.debug("%s: %s", episode.source, warning)

    config = {
        "input": str(args.input),
        "context_lines": args.context_lines,
        "valid_share": args.valid_share,
        "split_seed": args.split_seed,
    }
    dataset = build_dataset(episodes, args.context_lines, args.valid_share, args.split_seed)
    summary = build_summary(episodes, dataset, config)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.output_dir / "train.jsonl", dataset.train)
    write_jsonl(args.output_dir / "valid.jsonl", dataset.valid)
    (args.output_dir / "summary.json").write_text(
        json.dumps(summary, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    print(format_summary(summary))
    print(f"wrote {args.output_dir / 'train.jsonl'}, valid.jsonl and summary.json")
    return _report_failures(summary, args.allow_missing_joey)


def _report_failures(summary: dict[str, Any], allow_missing_joey: bool) -> int:
    failed = False
    for episode in summary["episodes_without_lines"]:
        logger.error("%s: no spoken lines found; check the file's layout", episode)
        failed = True
    for episode in summary["episodes_without_joey"]:
        if episode in summary["episodes_without_lines"]:
            continue
        log = logger.warning if allow_missing_joey else logger.error
        log("%s: no line of %s found", episode, JOEY)
        failed = failed or not allow_missing_joey
    if summary["examples"]["train"] == 0:
        logger.error("no training examples were written")
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
