"""history.json as its readers get it: the typed `RunHistory` loads what `RunRecord` writes (and the
histories written before checkpoints were named), keeps what it does not know, and decides once
which round is the last completed and the last validated; the summary and the report show one table."""

from __future__ import annotations

import argparse
import html
import json
import math
import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from common.config import run_config
from server.run_record import HistoryFormatError, RoundRecord, RunHistory, RunRecord, final_site_table, run_status, weighted_as_it_ran
from server.run_options import RunOptionsError, _chosen_config


ARRAYS = ArrayRecord({"w": Array(np.zeros((2, 2), np.float32))})


def _site(dice: float, **more) -> dict:
    return {"examples": 40, "epsilon": 2.5, "noise_multiplier": 1.1, "status": "ok", "train_seconds": 3.0, "val_dice": dice, "val_hd95_mm": 12.34,
            "val_dice_per_class": [dice * 2, 0.0], "val_seconds": 1.0, "train_reply_bytes": 1000, **more}


def _written_run(tmp_path) -> RunRecord:
    """Rounds 0 and 1 completed and validated, round 2 in flight; ε = ∞ and an undefined HD95 at one site."""
    record = RunRecord(tmp_path, run_config({"min-sites": 1, "classes": "organ,lesion"}))
    record.site_nodes["7"] = "site-a"
    record.save_checkpoint(0, ARRAYS, {})
    record.site(0, "site-a").update(val_dice=0.01, val_dice_per_class=[0.02, 0.0], status="ok")
    record.close_round(0, 0.01)
    record.start_round(1)
    record.round(1)["train_bytes_to_each_site"] = 500
    record.site(1, "site-a").update(_site(0.4))
    record.site(1, "site-b").update(_site(0.3, epsilon=math.inf, val_hd95_mm=math.nan))
    record.save_checkpoint(1, ARRAYS, {})
    record.close_round(1, 0.35)
    record.event("round 2: retry 1 of 2")
    record.start_round(2)
    record.site(2, "site-a").update(examples=40, status="ok")
    record.write_history()
    return record


def test_a_history_written_by_the_run_record_loads_typed_with_its_values(tmp_path):
    record = _written_run(tmp_path)
    text = (tmp_path / "history.json").read_text()
    history = RunHistory.read(tmp_path)
    assert history.status == "running" and history.privacy_unit == "patient" and history.site_nodes == {"7": "site-a"}
    assert history.config == record.config and history.wall_time_s > 0
    assert [r.round for r in history.rounds] == [0, 1, 2]
    zero, one, two = history.rounds
    assert (zero.checkpoint, zero.duration_s, zero.dice) == ("global_model-round000.pt", None, 0.01)
    assert one.checkpoint == "global_model-round001.pt" and one.duration_s >= 0 and one.dice == 0.35
    assert one.train_bytes_to_each_site == 500 and one.evaluate_bytes_to_each_site is None
    assert (two.checkpoint, two.dice, two.duration_s) == (None, None, None) and not two.completed
    assert one.sites["site-b"]["epsilon"] == "inf" and one.sites["site-b"]["val_hd95_mm"] is None  # entries: as the file has them
    assert history.site_series("epsilon") == {"site-a": ([1], [2.5]), "site-b": ([1], [math.inf])}
    assert [e.event for e in history.events] == ["round 2: retry 1 of 2"] and history.events[0].time > 0
    assert history.last_completed() is one and history.last_validated() is one
    assert history.dice_series()[:2] == [0.01, 0.35] and math.isnan(history.dice_series()[2])
    assert history.durations() == {1: one.duration_s} and history.site_names() == ["site-a", "site-b"]
    assert json.dumps(history.to_json(), indent=1) == text  # written back byte for byte
    assert record.history().rounds == history.rounds
    assert run_status(tmp_path) == "running"


def test_numbers_read_as_history_number_reads_them():
    r = RoundRecord.from_json({"round": 3, "sites": {}, "dice": None, "duration_s": "inf"})
    assert r.validated and math.isnan(r.dice) and r.duration_s == math.inf
    assert r.to_json() == {"round": 3, "sites": {}, "dice": None, "duration_s": "inf"}


OLD_HISTORY = {  # before 2026-11-23: no checkpoint names, no events, status or wall time (nor, until 11-24, ct-window or class
    # weights; until 12-08, spacing)
    "config": None,
    "rounds": [{"round": 0, "sites": {"site-a": {"val_dice": 0.01}}, "dice": 0.01},
               {"round": 1, "sites": {"site-a": {"val_dice": 0.2, "examples": 40}}, "dice": 0.2},
               {"round": 2, "sites": {"site-a": {"val_dice": None, "examples": 40}}, "dice": None},
               {"round": 3, "sites": {"site-a": {"examples": 40}}}],
}


def test_an_older_history_loads_and_resume_picks_the_same_round_as_before(tmp_path):
    config = {**{k: v for k, v in run_config({"min-sites": 1, "num-server-rounds": 4}).items() if k not in ("ct-window", "spacing", "mr-intensity")},
              "classes": "organ,lesion"}  # before per-class weights: the code weighed organ 2 and lesion 40
    old = {**OLD_HISTORY, "config": config}
    (tmp_path / "history.json").write_text(json.dumps(old))
    before = max(r["round"] for r in old["rounds"] if "checkpoint" in r or "dice" in r)  # resume's rule until now
    (tmp_path / "checkpoints").mkdir()
    torch.save({"round": before, "state_dict": {}}, tmp_path / "checkpoints" / f"global_model-round{before:03d}.pt")

    history = RunHistory.read(tmp_path)
    assert history.status is None and history.events == [] and history.wall_time_s is None
    assert [r.round for r in history.completed_rounds()] == [0, 1, 2] and history.last_completed().round == before == 2
    assert history.last_validated().round == 2 and math.isnan(history.last_validated().dice)  # null Dice: validated, undefined
    assert run_status(tmp_path) is None

    # A resume that asks for another window (flwr run's config) does not change the run's mid-way.
    record, checkpoint, done = RunRecord.resume(tmp_path, run_config({"resume": True, "num-server-rounds": 6, "ct-window": "-200,1500",
                                                                      "spacing": 2.0}))
    assert done == before and checkpoint["round"] == before
    assert [record.rounds[n] for n in sorted(record.rounds)] == old["rounds"][:3]  # kept as they were
    assert record.elapsed_before == 0.0 and record.config["num-server-rounds"] == 6
    assert record.config["ct-window"] == "-160,240"  # the window it was trained with, sent to the sites from now on
    assert record.config["spacing"] == 0.0  # whole slices, as it trained, not the default's 4 mm nor the resume's 2
    assert record.config["mr-intensity"] == "percentiles"
    assert record.config["classes"] == "organ:2,lesion:40"  # and the class weights (written out since)
    assert record.events[-1]["event"] == "resumed after round 2; round 3 (in flight at the stop) is run again"


def test_the_last_validated_round_is_not_always_the_last_completed():
    history = RunHistory.from_json({"config": {}, "rounds": [
        {"round": 0, "sites": {}, "checkpoint": "global_model-round000.pt", "dice": 0.1},
        {"round": 1, "sites": {"a": {"val_dice": 0.5}}, "checkpoint": "global_model-round001.pt", "dice": 0.5},
        {"round": 2, "sites": {"a": {"status": "ok"}}, "checkpoint": "global_model-round002.pt"},  # no site online to validate it
    ]})
    assert history.last_completed().round == 2 and history.last_validated().round == 1
    assert [r.round for r in history.validated_rounds()] == [0, 1]
    assert final_site_table(history).round == 1
    empty = RunHistory.from_json({"config": {}, "rounds": [{"round": 0, "sites": {"a": {}}}]})
    assert empty.last_validated() is None and empty.last_completed() is None
    assert final_site_table(empty).round is None and final_site_table(empty).rows == ()


def test_unknown_keys_survive_a_load_and_save_round_trip(tmp_path):
    data = {"config": {"classes": "organ"}, "status": "completed", "future_run_key": [1, 2],
            "rounds": [{"round": 0, "sites": {"a": {"val_dice": 0.2, "val_new_metric": {"x": None}}}, "aggregator_note": "kept",
                        "checkpoint": "global_model-round000.pt", "dice": 0.2}],
            "events": [{"time": 1.0, "event": "stopped", "by": "operator"}]}
    history = RunHistory.from_json(data)
    assert history.extra == {"future_run_key": [1, 2]} and history.rounds[0].extra == {"aggregator_note": "kept"}
    assert history.events[0].extra == {"by": "operator"}
    assert json.dumps(history.to_json()) == json.dumps(data)  # same keys, same order
    # ... and through a resume, into the history the resumed run writes
    (tmp_path / "history.json").write_text(json.dumps({**data, "config": run_config({"min-sites": 1})}))
    (tmp_path / "checkpoints").mkdir()
    torch.save({"round": 0}, tmp_path / "checkpoints" / "global_model-round000.pt")
    RunRecord.resume(tmp_path, run_config({"resume": True}))
    again = RunHistory.read(tmp_path)
    assert again.rounds[0].extra == {"aggregator_note": "kept"} and again.rounds[0].sites == data["rounds"][0]["sites"]
    assert again.events[0].extra == {"by": "operator"}


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"rounds": []}', '{"config": {}, "rounds": [{"sites": {}}]}',
                                  '{"config": {}, "rounds": {}}'])
def test_what_is_not_a_history_is_refused_as_a_value_error(tmp_path, text):
    (tmp_path / "history.json").write_text(text)
    with pytest.raises(ValueError):
        RunHistory.read(tmp_path)
    assert run_status(tmp_path) is None
    with pytest.raises(RunOptionsError, match="no readable history.json"):
        _chosen_config(argparse.Namespace(resume=str(tmp_path), rounds=None, round_timeout=None, round_retries=None), None, tmp_path)
    assert issubclass(HistoryFormatError, ValueError)


def test_the_resume_config_is_the_runs_own(tmp_path):
    _written_run(tmp_path)
    args = argparse.Namespace(resume=str(tmp_path), rounds=9, round_timeout=None, round_retries=None)
    config = _chosen_config(args, None, tmp_path)
    assert config["num-server-rounds"] == 9 and config["classes"] == "organ:1,lesion:1" and config["resume"] is True
    # The run itself, resumed: its user's weightless list was written out as 1 / 1, and stays so.
    record, _, done = RunRecord.resume(tmp_path, run_config({"resume": True}))
    assert done == 1 and record.config["classes"] == "organ:1,lesion:1"


def test_a_run_from_before_class_weights_is_given_that_codes_weights():
    """Then the code weighed the first class 2 and the last 40, those between geometrically."""
    assert weighted_as_it_ran("organ,lesion") == "organ:2,lesion:40" and weighted_as_it_ran("liver") == "liver:2"
    assert weighted_as_it_ran("a, b, c") == "a:2,b:8.94427191,c:40" and weighted_as_it_ran("a:1,b:1") == "a:1,b:1"


def test_the_final_table_of_a_history_with_a_list_refused_today_still_reads(tmp_path):
    _written_run(tmp_path)
    history = RunHistory.read(tmp_path)
    history.config["classes"] = "organ,organ"  # accepted by older code, refused by today's class_spec
    assert final_site_table(history).header[3] == "Dice per class"


def _markdown_rows(text: str) -> list[list[str]]:
    lines = text[text.index("| site |"):].splitlines()
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("|")]


def _html_rows(page: str) -> list[list[str]]:
    table = page[page.index("<h2>Sites, final round</h2>"):]
    table = table[:table.index("</table>")]
    return [[html.unescape(c) for c in re.findall(r"<t[hd]>(.*?)</t[hd]>", row)] for row in re.findall(r"<tr>(.*?)</tr>", table)]


def test_the_summary_and_the_report_show_the_same_final_table(tmp_path):
    from server.report import write_report

    record = _written_run(tmp_path)
    record.finish("completed")
    table = final_site_table(RunHistory.read(tmp_path))
    assert table.round == 1 and [row[0] for row in table.rows] == ["site-a", "site-b"]
    assert table.rows[1] == ("site-b", "40", "0.300", "0.600 / 0.000", "–", "inf", "ok")
    summary = record.summary()
    assert "| 1 | 0.350 |" in summary and "| 2 | – | – |" in summary
    markdown = _markdown_rows(summary)
    assert markdown[0] == list(table.header) and markdown[2:] == [list(row) for row in table.rows]
    assert _markdown_rows((tmp_path / "summary.md").read_text()) == markdown
    page = write_report(tmp_path).read_text()
    assert _html_rows(page) == [list(table.header)] + [list(row) for row in table.rows]
    assert "Final round: 1" in page and "final foreground Dice <b>0.350</b>" in page and "retry 1 of 2" in page


def test_the_bench_reads_round_overhead_and_communication_from_the_typed_history(tmp_path):
    from simulations.bench import _final_sites, communication, round_overhead

    history = RunHistory.read(_written_run(tmp_path).dir)
    overhead = round_overhead(history)
    assert [x["round"] for x in overhead["rounds"]] == [1]
    assert overhead["rounds"][0]["slowest_site_compute_s"] == 3.0  # round 1's training; round 0 had no val_seconds
    assert communication(history) == {"to_site_bytes_per_round": 500.0, "from_site_bytes_per_round": 1000.0}
    assert _final_sites(history)["site-a"] == {"dice": 0.4, "hd95_mm": 12.34, "dice_per_class": [0.8, 0.0]} and math.isnan(_final_sites(history)["site-b"]["hd95_mm"])
