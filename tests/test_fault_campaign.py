"""The fault campaign with tiny sizes: nothing may be lost, and the campaign must notice real losses."""

from __future__ import annotations

import json

import torch

from tests.fault_campaign import checkpoints as campaign_checkpoints
from tests.fault_campaign import cli as fault_campaign
from tests.fault_campaign.checkpoints import PlantedCase, pickle_globals, run_checkpoints, run_planted
from tests.fault_campaign.common import LOST
from tests.fault_campaign.inputs import KINDS, TARGETS, InputContext, make_cases, run_case
from tests.fault_campaign.kills import KillSettings, run_kills


def test_bad_inputs_through_the_command(tmp_path, capsys):
    """One case of every kind (covering every dataset target too), run by the command-line entry point."""
    out = tmp_path / "campaign.json"
    code = fault_campaign.main(["--bad_inputs", str(len(KINDS)), "--kills", "0", "--checkpoints", "0",
                                "--properties", "0", "--work_dir", str(tmp_path / "work"), "--json", str(out)])
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    campaign = report["campaigns"][0]
    lost = [case for case in campaign["cases"] if case["outcome"] == LOST]
    assert campaign["lost"] == 0 and not lost, lost
    assert code == 0 and report["lost"] == 0
    assert {case["kind"] for case in campaign["cases"]} == set(KINDS)
    assert {case["where"] for case in campaign["cases"]} == {target.name for target in TARGETS}
    assert campaign["tried"] == len(KINDS)
    assert "== bad inputs: tried 19, lost 0" in printed and "nothing lost" in printed
    assert "campaign error" not in campaign["outcomes"]


def test_a_wrong_image_conversion_is_lost(tmp_path, monkeypatch):
    """Decoding 16-bit and CMYK images naively (clipping, dropping K) must be reported as lost."""
    from PIL import Image

    import dataset.images

    def naive(img: Image.Image) -> Image.Image:
        return Image.merge("RGB", img.split()[:3]) if img.mode == "CMYK" else img.convert("RGB")

    monkeypatch.setattr(dataset.images, "to_rgb", naive)
    ctx = InputContext(tmp_path)
    cases = [case for case in make_cases(2 * len(KINDS), seed=3) if case["kind"] in ("i16", "cmyk")]
    results = [run_case(case, ctx) for case in cases]
    assert results and all(r.outcome == LOST and "decoded wrongly" in r.detail for r in results), results


def test_malicious_checkpoints_are_refused(tmp_path):
    report = run_checkpoints(len(campaign_checkpoints.TECHNIQUES) + 2, seed=0, work_dir=tmp_path, truncated=0,
                             script_runs=0, log=lambda _: None)
    assert report.lost == 0, [c.as_dict() for c in report.cases if c.lost]
    assert report.tried == 2 * (len(campaign_checkpoints.TECHNIQUES) + 2)
    outcomes = report.outcomes()
    assert set(outcomes) <= {campaign_checkpoints.REFUSED, campaign_checkpoints.REFUSED_VAGUE}, outcomes
    assert outcomes[campaign_checkpoints.REFUSED] >= report.tried // 2
    assert not list(tmp_path.glob("checkpoints/marker_*"))


def test_truncated_checkpoints_give_clear_errors(tmp_path):
    report = run_checkpoints(0, seed=0, work_dir=tmp_path, truncated=12, script_runs=0, log=lambda _: None)
    assert report.tried == 24
    assert report.lost == 0, [c.as_dict() for c in report.cases if c.lost]


def test_a_loader_that_unpickles_everything_is_lost(tmp_path, monkeypatch):
    """The campaign notices executed payloads (here: a loader without weights_only)."""
    monkeypatch.setattr(campaign_checkpoints, "_loaders",
                        lambda: {"torch.load(weights_only=False)": lambda p: torch.load(p, weights_only=False)})
    results = run_planted(PlantedCase(0, "builtins_exec", "config", "zip", 1), tmp_path)
    assert [r.outcome for r in results] == [LOST]
    assert "the payload ran" in results[0].detail


def test_pickle_globals_finds_the_payload(tmp_path):
    path = tmp_path / "planted.pth"
    names = campaign_checkpoints.write_planted(path, "os_system", "nested", "legacy", tmp_path / "m", 0)
    found = campaign_checkpoints.file_globals(path)
    assert set(names) & found and "collections.OrderedDict" in found
    assert pickle_globals(campaign_checkpoints.crafted_pickle("inst_opcode", tmp_path / "m")) == {"os.system"}


def test_kill_and_resume(tmp_path):
    """One kill of an 8-step run (4 steps per epoch): the resumed run ends bitwise as the uninterrupted one,
    and so does an uninterrupted run that saves after every step."""
    report = run_kills(1, seed=0, work_dir=tmp_path, budget_seconds=120,
                       settings=KillSettings(epochs=2, images=16), log=lambda _: None)
    assert report.lost == 0, [c.as_dict() for c in report.cases]
    assert "1 of 1 requested" in report.summary["kills made"]
    assert (tmp_path / "kills" / "reference" / "checkpoint_01.pth").is_file()
    saving, *trials = report.cases
    assert saving.where == "Pretrain.py --save_every_steps 1" and saving.kind == "0 kill(s)"
    assert trials and trials[0].extra["kills"][0]["phase"] in ("startup", "training")
