"""Method §12's cached HPatches results files: written by cadist, read back (also in the layout
other evaluation code writes) without executing what a file asks for, summarised as §12 divides."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from cadist.cli import main
from cadist.errors import DataError
from cadist.eval.hpatches import evaluate, write_sequences
from cadist.eval.hpatches_results import PairResults, read_results, summarise, write_results


def _hand_results() -> PairResults:
    # one illumination and one viewpoint sequence: 5 pairs each, 12 images
    return PairResults(
        illumination={1: 2.0, 3: 4.0},
        viewpoint={1: 1.0, 3: 2.5},
        splits=["i"] * 5 + ["v"] * 5,
        features=[500, 480, 490, 470, 460, 450] + [400] * 6,
        matches=[100, 90, 80, 70, 60] + [10, 0, 20, 30, 40],
    )


def test_summary_divides_the_summed_accuracies_per_split():
    s = summarise(_hand_results())
    assert s["sequences"] == {"i": 1, "v": 1} and s["thresholds"] == [1, 3]
    assert s["mma"] == pytest.approx([0.3, 0.65])  # (2 + 1) / 10, (4 + 2.5) / 10
    assert s["mma_illumination"] == pytest.approx([0.4, 0.8])
    assert s["mma_viewpoint"] == pytest.approx([0.2, 0.5])
    assert s["mma@3"] == pytest.approx(0.65)
    assert s["features_per_image"] == pytest.approx((2850 + 2400) / 12)
    assert s["matches_per_pair"] == pytest.approx(500 / 10)
    assert s["matches_per_pair_illumination"] == 80 and s["matches_per_pair_viewpoint"] == 20


def test_evaluation_writes_the_file_and_it_reads_back_to_the_same_scores(tmp_path):
    seqs = write_sequences(
        tmp_path / "hp", illumination=1, viewpoint=2, height=64, width=96, seed=2
    )
    homs = {s.name: [np.eye(3)] + [np.loadtxt(s / f"H_1_{k}") for k in range(2, 7)] for s in seqs}
    grid = np.array([[x, y, 1.0] for y in range(8, 56, 8) for x in range(8, 88, 8)])
    calls = iter([(s.name, k) for s in sorted(seqs) for k in range(6)])
    rng = np.random.default_rng(0)

    def jittered(_rgb):  # exact matches, positions off by 0…6 px: MMA grows with θ
        name, k = next(calls)
        p = grid @ homs[name][k].T
        p = p / p[:, 2:]
        if k:
            p[:, :2] += rng.uniform(-3, 3, (len(p), 2))
        return {"keypoints": p, "descriptors": np.eye(len(grid))}

    r = evaluate(tmp_path / "hp", jittered, save_results=tmp_path / "out" / "mine.npy")
    assert 0 < r["mma"][0] < r["mma"][2] < r["mma"][5] == 1.0
    assert not [p for p in (tmp_path / "out").iterdir() if p.name != "mine.npy"]  # no temp left
    back = read_results(tmp_path / "out" / "mine.npy")
    assert back.splits == ["i"] * 5 + ["v"] * 10 and len(back.features) == 18
    assert summarise(back) == {k: v for k, v in r.items() if k != "gmac_per_image"}
    # a plain NumPy reads it too (the §12 layout: a pickled 3-element object array)
    plain = np.load(tmp_path / "out" / "mine.npy", allow_pickle=True)
    assert plain.shape == (3,) and plain[0][3] == pytest.approx(back.illumination[3])
    assert plain[2][0] == back.splits and plain[2][2] == back.matches


def test_reads_numpy_typed_results_as_other_evaluation_code_saves_them(tmp_path):
    h = _hand_results()
    arr = np.empty(3, dtype=object)
    arr[0] = {np.int64(t): np.float64(v) for t, v in h.illumination.items()}
    arr[1] = {t: np.float32(v) for t, v in h.viewpoint.items()}
    arr[2] = [np.array(h.splits), np.array(h.features), np.array(h.matches, np.int32)]
    np.save(tmp_path / "d2net_os4.npy", arr, allow_pickle=True)
    assert summarise(read_results(tmp_path / "d2net_os4.npy")) == summarise(h)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_results_file_cannot_run_code_and_bad_files_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    arr = np.empty(3, dtype=object)
    arr[0], arr[1], arr[2] = {3: 1.0}, _Evil(), [[], [], []]
    np.save(tmp_path / "evil.npy", arr, allow_pickle=True)
    with pytest.raises(
        DataError, match=r"evil\.npy: refusing to load: the pickle asks for .*system"
    ):
        read_results(tmp_path / "evil.npy")
    assert not (tmp_path / "pwned").exists()
    np.save(tmp_path / "floats.npy", np.zeros((3, 15)))
    with pytest.raises(
        DataError, match=r"floats\.npy: a float64 array .* pickled 3-element object"
    ):
        read_results(tmp_path / "floats.npy")
    (tmp_path / "text.npy").write_text("hello")
    with pytest.raises(DataError, match=r"text\.npy: not a NumPy \.npy file"):
        read_results(tmp_path / "text.npy")
    h = _hand_results()
    write_results(
        tmp_path / "short.npy",
        PairResults(h.illumination, h.viewpoint, h.splits, h.features[:5], h.matches),
    )
    with pytest.raises(DataError, match=r"short\.npy: 10 pairs, 10 match counts and 5 feature"):
        read_results(tmp_path / "short.npy")
    write_results(
        tmp_path / "big.npy", PairResults({3: 7.0}, h.viewpoint, h.splits, h.features, h.matches)
    )
    with pytest.raises(
        DataError, match=r"big\.npy: part illumination: summed accuracy at 3 px is 7"
    ):
        read_results(tmp_path / "big.npy")


def test_compare_cli_prints_the_table_beside_the_paper(tmp_path):
    h = _hand_results()
    write_results(tmp_path / "d2net_os4.npy", h)
    worse = PairResults({1: 1.0, 3: 2.0}, {1: 0.0, 3: 1.0}, h.splits, h.features, h.matches)
    write_results(tmp_path / "mine.npy", worse)
    files = [str(tmp_path / "d2net_os4.npy"), str(tmp_path / "mine.npy")]
    r = CliRunner().invoke(main, ["hpatches", "compare", *files])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert lines[0].startswith("| method | MMA@1 | MMA@3 |") and len(lines) == 4
    assert lines[2].startswith(
        "| d2net_os4 | 0.3000 | 0.6500 | – | – | 0.8000 | 0.5000 | 437.50 | 50.0 | 0.6467 |"
    )
    assert lines[3] == "| mine | 0.1000 | 0.3000 | – | – | 0.4000 | 0.2000 | 437.50 | 50.0 | – |"
    r = CliRunner().invoke(main, ["hpatches", "compare", "--json", *files])
    rows = json.loads(r.stdout)["results"]
    assert [x["mma@3"] for x in rows] == pytest.approx([0.65, 0.3])
    assert rows[0]["paper_mma@3"] == 0.6467 and rows[1]["paper_mma@3"] is None
    r = CliRunner().invoke(main, ["hpatches", "compare", str(tmp_path / "nope.npy")])
    assert r.exit_code != 0 and "nope.npy: no such results file" in r.output
