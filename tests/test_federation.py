"""The built-in federation's size: patient-level DP needs tens of patients per site, so that is the
default, and `--patients` sets it (sites still differ in their counts)."""

import json

from simulations.federation import site_profiles


def test_default_sites_hold_at_least_50_patients_and_differ():
    counts = [p.patients for p in site_profiles(3)]
    assert min(counts) >= 50 and len(set(counts)) > 1


def test_patients_sets_each_built_in_sites_count(fedseg_here, tmp_path):
    done = fedseg_here("demo-data", "out", "--sites", "2", "--size", "tiny", "--patients", "3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (root,) = (tmp_path / "out").iterdir()
    meta = json.loads((root / "federation.json").read_text())
    for site in meta["sites"]:
        patients = sorted(p.name for p in (root / site["site"]).iterdir())
        assert 3 <= len(patients) <= 4 and len(patients) == site["patients"]
    default = fedseg_here("demo-data", "out", "--sites", "2", "--size", "tiny", cwd=tmp_path)
    assert default.returncode == 0 and len(list((tmp_path / "out").iterdir())) == 2  # another count, another folder


def test_patients_below_two_is_refused(fedseg_here, tmp_path):
    done = fedseg_here("demo-data", "out", "--patients", "1", cwd=tmp_path)
    assert done.returncode != 0 and "at least 2 patients" in done.stderr
    assert not (tmp_path / "out").exists()
