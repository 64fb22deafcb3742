"""Transcript parsing, text cleaning, examples and the data preparation command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.examples import (
    REASON_CONTEXT_ENDS_WITH_JOEY,
    REASON_GROUP,
    REASON_NO_CONTEXT,
    Candidate,
    UnusableRecordError,
    iter_joey_lines,
    record_to_turns,
    unusable_reason,
)
from training.prepare_data import choose_valid_groups, episode_group, main, read_jsonl
from training.text import clean_spoken_text, decode_bytes, has_mojibake, remove_directions
from training.transcripts import normalize_speaker, parse_html_episode, read_table


def parse(html: str | bytes, episode_id: str = "0101"):
    data = html.encode("utf-8") if isinstance(html, str) else html
    return parse_html_episode(data, episode_id)


def spoken(episode) -> list[tuple[str, str]]:
    return [(line.speaker, line.text) for scene in episode.scenes for line in scene]


# --- HTML layouts -----------------------------------------------------------------------------


def test_bold_speakers_with_wrapped_lines():
    episode = parse(
        """<html><head><title>The One With The Test</title></head><body>
        <h1>The One With The Test</h1>
        <p>Written by: Somebody &amp; Somebody Else<br>Transcribed by: A Fan</p>
        <p><b>Monica:</b> There's nothing to tell! He's just some guy
        I work with!</p>
        <p><strong>Joey:</strong> C'mon, you're going out with the guy!
          There's gotta be something wrong with him!</p>
        </body></html>"""
    )
    assert spoken(episode) == [
        ("Monica", "There's nothing to tell! He's just some guy I work with!"),
        (
            "Joey",
            "C'mon, you're going out with the guy! There's gotta be something wrong with him!",
        ),
    ]
    assert episode.dropped["title and credits"] == 3  # the heading and two credit lines


def test_plain_speakers_separated_by_br():
    episode = parse(
        """<p align="left">[Scene: Central Perk, the gang is there.]<br>
        <br>
        CHANDLER: Hey.<br>
        <br>
        JOEY: (to Chandler) Hey! [sits down] What's up?<br>
        <br>
        MR. HECKLES: You're doing it again.<br></p>"""
    )
    assert spoken(episode) == [
        ("Chandler", "Hey."),
        ("Joey", "Hey! What's up?"),
        ("Mr. Heckles", "You're doing it again."),
    ]


def test_both_speaker_styles_in_one_file():
    episode = parse(
        """<p><b>Ross:</b> Hi.</p>
        <p>JOEY: Hey Ross.</p>
        <p><B>Rachel</B>: Hi guys.</p>"""
    )
    assert spoken(episode) == [("Ross", "Hi."), ("Joey", "Hey Ross."), ("Rachel", "Hi guys.")]


def test_scene_headings_and_breaks_start_new_scenes():
    episode = parse(
        """<p>[Scene: Central Perk]</p>
        <p><b>Joey:</b> One.</p>
        <p>[Time Lapse]</p>
        <p><b>Joey:</b> Two.</p>
        <p align="center"><b>Commercial Break</b></p>
        <p>Scene: Joey's apartment.</p>
        <p><b>Joey:</b> Three.</p>
        <p>*Closing Credits*</p>
        <p><b>Joey:</b> Four.</p>
        <p align="center">End</p>"""
    )
    assert [[line.text for line in scene] for scene in episode.scenes] == [
        ["One."],
        ["Two."],
        ["Three."],
        ["Four."],
    ]


def test_stage_directions_removed_from_lines():
    episode = parse(
        """<p><b>Chandler:</b> Hi.</p>
        <p>(They all stare, bemused.)</p>
        <p><b>Joey:</b> (entering) Hey! (He sits.) What's up [looks around] guys?</p>
        <p><b>Joey:</b> &lt;laughs&gt; Sure.</p>
        <p><b>Joey:</b> I'm just gonna (walks out without closing the bracket</p>
        <p><b>Joey:</b> (nods)</p>"""
    )
    assert spoken(episode) == [
        ("Chandler", "Hi."),
        ("Joey", "Hey! What's up guys?"),
        ("Joey", "Sure."),
        ("Joey", "I'm just gonna"),
    ]
    assert episode.dropped["empty after removing directions"] == 1
    assert episode.dropped["text without a speaker"] == 0


def test_direction_between_speaker_and_colon():
    episode = parse("<p>Joey (to Ross): Dude!</p><p>JOEY [on phone]: Hello?</p>")
    assert spoken(episode) == [("Joey", "Dude!"), ("Joey", "Hello?")]


def test_description_before_colon_names_speaker():
    episode = parse(
        """<p>Ross: Hi.</p>
        <p>Joey nods: Yeah.</p>
        <p>Ross to Monica: Hi.</p>
        <p>TV announcer: Next up, a marching band.</p>"""
    )
    assert spoken(episode) == [
        ("Ross", "Hi."),
        ("Joey", "Yeah."),
        ("Ross", "Hi."),
        ("TV Announcer", "Next up, a marching band."),
    ]


def test_bold_speaker_without_colon():
    episode = parse(
        """<p><b>Phoebe:</b> Can I have a bite?</p>
        <p><b>Joey:</b> Okay.</p>
        <p><b>Phoebe</b> Thank you.</p>"""
    )
    assert spoken(episode)[-1] == ("Phoebe", "Thank you.")


def test_two_speakers_in_one_paragraph():
    episode = parse(
        """<p><b>Monica:</b> Maybe. <b>Joey:</b> Wait. Your date is with Paul?</p>
        <p>MR. TREEGER: It coulda been me.ROSS: Sure, sweepin'.</p>
        <p>CHANDLER: Hey.
        RACHEL: Hi.</p>"""
    )
    assert spoken(episode) == [
        ("Monica", "Maybe."),
        ("Joey", "Wait. Your date is with Paul?"),
        ("Mr. Treeger", "It coulda been me."),
        ("Ross", "Sure, sweepin'."),
        ("Chandler", "Hey."),
        ("Rachel", "Hi."),
    ]


def test_single_br_continues_line():
    episode = parse(
        """<p><b>Ross:</b> I've been putting my life<BR>on hold for Emma.</p>
        <p><b>Joey:</b> Dude.</p>"""
    )
    assert spoken(episode)[0] == ("Ross", "I've been putting my life on hold for Emma.")


def test_text_without_speaker_counted():
    episode = parse("<p><b>Joey:</b> Hi.</p><p>Thanksgiving 1978</p>")
    assert spoken(episode) == [("Joey", "Hi.")]
    assert episode.dropped["text without a speaker"] == 1


def test_cr_line_ends_wrap_lines():
    html = "<p><b>Joey:</b> How you\rdoin'?</p>\r\n<p><b>Ross:</b> Fine.</p>\r"
    assert spoken(parse(html)) == [("Joey", "How you doin'?"), ("Ross", "Fine.")]


# --- encodings and entities -------------------------------------------------------------------


def test_cp1252_bytes_decoded():
    data = b"<p><b>Joey:</b> It\x92s a \x93moo\x94 point\x85 \x96 like a cow\x92s opinion.</p>"
    episode = parse(data)
    assert spoken(episode) == [("Joey", "It’s a “moo” point… – like a cow’s opinion.")]
    assert episode.warnings == ["not valid UTF-8, decoded as cp1252"]


def test_utf8_file_kept_as_utf8():
    text, note = decode_bytes("<p>JOEY: Caf\u00e9 \u2019round</p>".encode())
    assert text == "<p>JOEY: Café ’round</p>"
    assert note == ""


def test_undefined_cp1252_byte_removed():
    episode = parse(b"<p><b>Joey:</b> Hey\x81 there \x92cause.</p>")
    assert spoken(episode) == [("Joey", "Hey there ’cause.")]


def test_html_entities_decoded():
    episode = parse(
        "<p><b>Joey:</b> &quot;Hi&quot; &amp; &#146;bye&#146;&nbsp;&nbsp;caf&eacute;&#133;</p>"
    )
    assert spoken(episode) == [("Joey", '"Hi" & ’bye’ café…')]


def test_clean_text_has_no_control_or_replacement_characters():
    assert clean_spoken_text("Hey\ufffd \x07you\u00a0 guys ,  right ?") == "Hey you guys, right?"


def test_mojibake_detected():
    assert has_mojibake("It\u00e2\u20ac\u2122s")
    assert not has_mojibake("It’s café")


def test_nested_directions_removed():
    assert " ".join(remove_directions("A (b (c) d) E [f] G").split()) == "A E G"


# --- speakers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("JOEY", ("Joey", False)),
        ("Joey Tribbiani", ("Joey", False)),
        ("joey", ("Joey", False)),
        ("Jeoy", ("Joey", False)),
        ("Phoe", ("Phoebe", False)),
        ("MR. HECKLES", ("Mr. Heckles", False)),
        ("All", ("All", True)),
        ("Everyone", ("Everyone", True)),
        ("Joey and Chandler", ("Joey and Chandler", True)),
        ("Ross, Rachel & JOEY", ("Ross and Rachel and Joey", True)),
    ],
)
def test_speaker_normalized(label, expected):
    assert normalize_speaker(label) == expected


def test_group_line_with_joey_is_context_only():
    episode = parse(
        """<p>Ross: Guess what?</p>
        <p>Joey and Chandler: What?</p>
        <p>Ross: I'm getting married.</p>
        <p>Joey: Again?</p>
        <p>All: Congratulations!</p>"""
    )
    items = list(iter_joey_lines(episode, context_lines=6))
    assert items[0] == REASON_GROUP
    assert isinstance(items[1], Candidate)
    assert items[1].reply == "Again?"
    assert [line.speaker for line in items[1].context] == ["Ross", "Joey and Chandler", "Ross"]
    assert len(items) == 2


def test_context_limited_to_scene_and_count():
    episode = parse(
        """<p>Ross: One.</p><p>[Scene: Elsewhere]</p>
        <p>Ross: Two.</p><p>Monica: Three.</p><p>Rachel: Four.</p><p>Joey: Five.</p>"""
    )
    (candidate,) = iter_joey_lines(episode, context_lines=2)
    assert [line.text for line in candidate.context] == ["Three.", "Four."]
    assert candidate.to_record()["id"] == "0101-s2-l4"
    assert candidate.to_record()["scene"] == 2


# --- records to turns -------------------------------------------------------------------------


def record(*lines: tuple[str, str], reply: str = "How you doin'?") -> dict:
    return {
        "id": "0101-s1-l9",
        "episode": "0101",
        "scene": 1,
        "context": [{"speaker": speaker, "text": text} for speaker, text in lines],
        "reply": reply,
    }


def test_record_to_turns_merges_speakers():
    turns, reply = record_to_turns(
        record(
            ("Monica", "Hi."),
            ("Ross", "Hello."),
            ("Joey", "Hey."),
            ("Joey", "What's up?"),
            ("Chandler and Joey", "Yo."),
            ("Rachel", "Nothing."),
        )
    )
    assert [(turn.role, turn.content) for turn in turns] == [
        ("user", "Hi.\nHello."),
        ("assistant", "Hey.\nWhat's up?"),
        ("user", "Yo.\nNothing."),
    ]
    assert reply == "How you doin'?"


def test_record_ending_with_joey_is_unusable():
    ends_with_joey = record(("Ross", "Hi."), ("Joey", "Hey."))
    assert unusable_reason(ends_with_joey) == REASON_CONTEXT_ENDS_WITH_JOEY
    with pytest.raises(UnusableRecordError, match="ends with Joey"):
        record_to_turns(ends_with_joey)


def test_record_without_context_is_unusable():
    assert unusable_reason(record()) == REASON_NO_CONTEXT


# --- CSV and TSV input ------------------------------------------------------------------------


def test_csv_lines_read(tmp_path: Path):
    path = tmp_path / "friends.csv"
    path.write_text(
        "text,speaker,season,episode,scene\n"
        '"Hi, Joey.",Monica,1,1,1\n'
        "How you doin'? (winks),JOEY,1,1,1\n"
        "Bye.,Ross,1,1,2\n"
        "Hey.,Joey,1,2,1\n",
        encoding="utf-8",
    )
    episodes = read_table(path)
    assert [episode.episode_id for episode in episodes] == ["0101", "0102"]
    assert [[(line.speaker, line.text) for line in scene] for scene in episodes[0].scenes] == [
        [("Monica", "Hi, Joey."), ("Joey", "How you doin'?")],
        [("Ross", "Bye.")],
    ]


def test_tsv_with_other_column_names(tmp_path: Path):
    path = tmp_path / "lines.tsv"
    path.write_bytes(
        b"season\tepisode\tscene\tcharacter\tline\n1\t1\t1\tRoss\tHi.\n1\t1\t1\tJoey\tIt\x92s me.\n"
    )
    (episode,) = read_table(path)
    assert [(line.speaker, line.text) for line in episode.scenes[0]] == [
        ("Ross", "Hi."),
        ("Joey", "It’s me."),
    ]


def test_csv_without_speaker_column_rejected(tmp_path: Path):
    path = tmp_path / "bad.csv"
    path.write_text("season,episode,scene,text\n1,1,1,Hi\n", encoding="utf-8")
    with pytest.raises(ValueError, match="missing a 'speaker' column"):
        read_table(path)


# --- split and command line -------------------------------------------------------------------


def test_episode_versions_share_split_group():
    assert episode_group("0423uncut") == episode_group("0423") == "0423"
    assert episode_group("07outtakes") == "07outtakes"


def test_valid_groups_deterministic():
    groups = [f"{season:02d}{episode:02d}" for season in range(1, 4) for episode in range(1, 21)]
    chosen = choose_valid_groups(groups, 0.1, seed=0)
    assert chosen == choose_valid_groups(list(reversed(groups)), 0.1, seed=0)
    assert len(chosen) == 6
    assert choose_valid_groups(groups, 0.1, seed=1) != chosen
    assert choose_valid_groups(groups, 0.0, seed=0) == set()


EPISODE_WITH_JOEY = """<p>[Scene: Central Perk]</p>
<p><b>Ross:</b> Hi.</p><p><b>Joey:</b> Hey Ross.</p>
<p><b>Ross:</b> How are you?</p><p><b>Joey:</b> Hungry.</p>"""


def write_episodes(folder: Path, with_joey: int, without_joey: int) -> None:
    folder.mkdir()
    for number in range(1, with_joey + 1):
        (folder / f"01{number:02d}.html").write_text(EPISODE_WITH_JOEY, encoding="utf-8")
    for number in range(with_joey + 1, with_joey + without_joey + 1):
        (folder / f"01{number:02d}.html").write_text(
            "<p><b>Ross:</b> Hi.</p><p><b>Rachel:</b> Hi.</p>", encoding="utf-8"
        )


def test_prepare_data_writes_outputs(tmp_path: Path, capsys):
    write_episodes(tmp_path / "in", with_joey=10, without_joey=0)
    code = main(["--input", str(tmp_path / "in"), "--output-dir", str(tmp_path / "out")])

    assert code == 0
    train = read_jsonl(tmp_path / "out" / "train.jsonl")
    valid = read_jsonl(tmp_path / "out" / "valid.jsonl")
    assert len(train) == 18
    assert len(valid) == 2
    assert {record["episode"] for record in train}.isdisjoint(r["episode"] for r in valid)
    first = sorted(train + valid, key=lambda r: r["id"])[0]
    assert first == {
        "id": "0101-s1-l2",
        "episode": "0101",
        "scene": 1,
        "context": [{"speaker": "Ross", "text": "Hi."}],
        "reply": "Hey Ross.",
    }
    summary = json.loads((tmp_path / "out" / "summary.json").read_text(encoding="utf-8"))
    assert summary["joey_lines"] == 20
    assert summary["examples"] == {"train": 18, "valid": 2}
    assert "examples written: 20" in capsys.readouterr().out


def test_prepare_data_fails_on_file_without_joey(tmp_path: Path, caplog):
    write_episodes(tmp_path / "in", with_joey=3, without_joey=1)
    arguments = ["--input", str(tmp_path / "in"), "--output-dir", str(tmp_path / "out")]

    assert main(arguments) == 1
    assert "0104: no line of Joey found" in caplog.text
    summary = json.loads((tmp_path / "out" / "summary.json").read_text(encoding="utf-8"))
    assert summary["episodes_without_joey"] == ["0104"]
    assert main([*arguments, "--allow-missing-joey"]) == 0


def test_prepare_data_missing_input(tmp_path: Path, caplog):
    assert main(["--input", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path)]) == 2
    assert "input not found" in caplog.text


def test_prepare_data_rejects_invalid_share(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--input", str(tmp_path), "--valid-share", "0.9"])
    assert exit_info.value.code == 2
    assert "--valid-share must be between 0 and 0.5" in capsys.readouterr().err
