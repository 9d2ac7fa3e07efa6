"""Demo-model training internals: the multi-task export and the compact checkpoint format."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve.catalogue import load_catalogue
from serve.inference.modelfolder import UNetSpec, build_network, make_dataset_json, make_plans, write_model_folder
from training.train import _ce_dice, _head_state, _heads, _joined_state, compact_checkpoint, model_labels

# demo-model training, not serving: left out of the default run (make test-training)
pytestmark = pytest.mark.training

SPEC = UNetSpec(features=(4, 8, 16), patch_size=(16, 16, 16))


def test_each_exported_head_is_that_submodels_slice_of_the_shared_network():
    cat = load_catalogue()
    sms = [cat.submodel("tissue_types"), cat.submodel("face"), cat.submodel("appendicular_bones")]
    heads = _heads(sms)
    n_out = sum(n for _, _, n in heads)
    assert n_out == (3 + 1) + (1 + 1) + (8 + 1)
    torch.manual_seed(0)
    plans = make_plans("Dataset925_shared", 1.5, SPEC)
    trunk = build_network(plans, make_dataset_json([f"c{i}" for i in range(1, n_out)])).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        full = trunk(x)
    for sm, (name, c0, n) in zip(sms, heads):
        net = build_network(make_plans(f"{sm.folder_prefix}{sm.name}", 1.5, SPEC),
                            make_dataset_json(model_labels(sm))).eval()
        net.load_state_dict(_head_state(trunk.state_dict(), c0, n))
        with torch.no_grad():
            torch.testing.assert_close(net(x), full[:, c0:c0 + n])


def test_compact_checkpoint_halves_the_file_and_still_loads(tmp_path):
    from serve.inference.modelload import load_model

    sm = load_catalogue().submodel("organs")
    folder = write_model_folder(tmp_path, sm, SPEC, seed=3)
    before = (folder / "fold_0" / "checkpoint_final.pth").stat().st_size
    ref = load_model(folder, sm, device="cpu").predictor.network
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        want = ref(x)
    after = compact_checkpoint(folder)
    assert after < 0.6 * before
    ckpt = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
    w = ckpt["network_weights"]
    assert {v.dtype for v in w.values() if v.is_floating_point()} == {torch.float16}
    # PlainConvUNet's decoder holds the encoder: the two names share one stored tensor
    shared = [k for k in w if k.startswith("decoder.encoder.")]
    assert shared and all(w[k].data_ptr() == w[k[len("decoder."):]].data_ptr() for k in shared)
    net = load_model(folder, sm, device="cpu").predictor.network
    assert next(net.parameters()).dtype == torch.float32
    with torch.no_grad():
        got = net(x)
    agree = (got.argmax(1) == want.argmax(1)).float().mean().item()
    assert agree > 0.99, agree
    assert np.isfinite(got.numpy()).all()


@pytest.mark.parametrize("name", ["organs", "total_fast"])
def test_model_labels_are_the_catalogue_labels(name):
    cat = load_catalogue()
    sm = cat.submodel(name) if name != "total_fast" else next(iter(cat.fast_variants))
    labels = model_labels(sm)
    if sm.is_fast_variant:
        assert labels == list(cat.submodel("organs").labels) + list(cat.submodel("muscles").labels)
    else:
        assert labels == list(sm.labels)


def test_ce_dice_equals_the_one_hot_formulation():
    torch.manual_seed(0)
    n = 7
    logits = torch.randn(2, n, 6, 5, 4, requires_grad=True)
    y = torch.randint(0, n, (2, 6, 5, 4))
    y[y == 3] = 0  # a class absent from the batch is left out of the Dice mean
    prob = torch.softmax(logits, 1)
    onehot = torch.nn.functional.one_hot(y, n).permute(0, 4, 1, 2, 3).float()
    dims = (0, 2, 3, 4)
    inter, denom = (prob * onehot).sum(dims)[1:], (prob.sum(dims) + onehot.sum(dims))[1:]
    present = onehot.sum(dims)[1:] > 0
    assert not bool(present[2])
    want = torch.nn.functional.cross_entropy(logits, y) + 1 - ((2 * inter + 1e-5) / (denom + 1e-5))[present].mean()
    got = _ce_dice(logits, y, n)
    torch.testing.assert_close(got, want)
    g_want, = torch.autograd.grad(want, logits)
    g_got, = torch.autograd.grad(got, logits)
    torch.testing.assert_close(g_got, g_want)
    # a batch of background only has no Dice term: the loss is the cross-entropy alone
    zeros = torch.zeros_like(y)
    torch.testing.assert_close(_ce_dice(logits, zeros, n), torch.nn.functional.cross_entropy(logits, zeros))


def test_exported_folders_rejoin_into_the_shared_network(tmp_path):
    """``--init-from``: the per-sub-model folders reassemble into the multi-head trunk they came from."""
    cat = load_catalogue()
    sms = [cat.submodel("tissue_types"), cat.submodel("face")]
    heads = _heads(sms)
    n_out = sum(n for _, _, n in heads)
    torch.manual_seed(1)
    trunk = build_network(make_plans("Dataset925_shared", 1.5, SPEC), make_dataset_json([f"c{i}" for i in range(1, n_out)]),
                          deep_supervision=True)
    for sm, (name, c0, n) in zip(sms, heads):
        write_model_folder(tmp_path, sm, SPEC, labels=model_labels(sm), state_dict=_head_state(trunk.state_dict(), c0, n))
    joined = _joined_state(sms, tmp_path)
    assert joined.keys() == trunk.state_dict().keys()
    for k, v in trunk.state_dict().items():
        torch.testing.assert_close(joined[k], v)


def test_bf16_autocast_trains_on_the_cpu_and_is_applied(tmp_path):
    """``bf16=True`` on the CPU gives a finite loss that differs from float32's on the same patches,
    while two float32 runs agree exactly (so the difference is the autocast, not noise)."""
    from training.train import make_cases, train_models

    cat = load_catalogue()
    sms = [cat.submodel("tissue_types"), cat.submodel("face")]
    cases = make_cases([0], 1.5, sms)

    def loss(out: str, bf16: bool) -> float:
        return train_models(sms, cases, tmp_path / out, seconds=120, spec=SPEC, max_iters=2, seed=1, bf16=bf16,
                            save_every_s=1e9)[0]["final_loss"]

    fp32, again, bf16 = loss("a", False), loss("b", False), loss("c", True)
    assert np.isfinite(bf16)
    assert fp32 == again
    assert bf16 != fp32


def test_init_from_a_folder_without_the_model_says_which_is_missing(tmp_path):
    cat = load_catalogue()
    with pytest.raises(FileNotFoundError, match="face.*--init-from needs"):
        _joined_state([cat.submodel("face")], tmp_path)


def _run_entry(model: str, iterations: int, seconds: float, loss: float) -> dict:
    return {"model": model, "iterations": iterations, "seconds": seconds, "final_loss": loss,
            "trained_with": ["organs", "face"]}


def test_a_continued_training_appends_a_stage_and_records_the_totals():
    from training.train import training_record

    init = {"notice": "old", "command": "how the stages were run", "machine": "2 CPU cores",
            "models": [{"model": "organs", "iterations": 300, "seconds": 400.0, "final_loss": 0.5,
                        "stages": [{"iterations": 100, "seconds": 150.0, "final_loss": 0.7, "how": "first"},
                                   {"iterations": 200, "seconds": 250.0, "final_loss": 0.5, "how": "second"}]},
                       {"model": "face", "iterations": 50, "seconds": 60.0, "final_loss": 0.9}]}
    run = [_run_entry("organs", 1000, 1200.5, 0.3), _run_entry("face", 1000, 1200.5, 0.3)]
    rec = training_record(run, how="--init-from (previous stage) --seed 6", cases=128, init=init)
    organs, face = rec["models"]
    assert [s["how"] for s in organs["stages"]] == ["first", "second", "--init-from (previous stage) --seed 6"]
    assert (organs["iterations"], organs["seconds"], organs["final_loss"]) == (1300, 1600.5, 0.3)
    # an entry written before stages were recorded becomes the first stage
    assert face["stages"][0] == {"iterations": 50, "seconds": 60.0, "final_loss": 0.9, "how": "(not recorded)"}
    assert (face["iterations"], face["seconds"]) == (1050, 1260.5)
    assert rec["command"] == "how the stages were run" and rec["machine"] == "2 CPU cores"
    assert rec["notice"].startswith("DEMO MODEL") and rec["training_seeds"] == "0..127"


def test_a_stage_that_widened_its_trunk_says_so_and_the_model_entry_does_not_keep_the_keys():
    from training.train import training_record

    entry = _run_entry("organs", 10, 20.0, 0.3) | {"widened_from": [8, 16], "widened_to": [16, 32]}
    rec = training_record([entry, _run_entry("face", 10, 20.0, 0.3)], how="--seed 10", cases=8)
    organs, face = rec["models"]
    assert organs["stages"][-1]["how"] == "--seed 10; trunk widened from features 8/16 to 16/32 first"
    assert face["stages"][-1]["how"] == "--seed 10"
    assert "widened_from" not in organs and "widened_to" not in organs
    assert "widened_from" in entry  # the caller's entry is left as it was


def test_a_fresh_training_has_one_stage_and_untrained_models_keep_their_entries():
    from training.train import training_record

    previous = {"models": [{"model": "total_fast", "iterations": 605, "seconds": 90.0, "final_loss": 1.19},
                           {"model": "organs", "iterations": 1, "seconds": 1.0, "final_loss": 2.0}]}
    rec = training_record([_run_entry("organs", 900, 1000.0, 0.4)], how="--budget 1000", cases=48,
                          previous=previous, machine="2 CPU threads (x)")
    organs, fast = rec["models"]
    assert organs["stages"] == [{"iterations": 900, "seconds": 1000.0, "final_loss": 0.4, "how": "--budget 1000",
                                 "machine": "2 CPU threads (x)"}]
    assert organs["iterations"] == 900
    assert fast == previous["models"][0]
    assert rec["training_seeds"] == "0..47"


def test_the_training_script_continues_a_committed_model_and_records_the_new_stage(tmp_path):
    """``training/train_demo_models.py --init-from``, end to end: a real (seconds-long) training stage."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from serve.inference.modelload import load_model

    root = Path(__file__).resolve().parents[2]
    committed = root / "serve" / "demo_models"
    committed_record = (committed / "DEMO_MODELS.json").read_text()
    before = {m["model"]: m for m in json.loads(committed_record)["models"]}["face"]
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-m", "training.train_demo_models", "--out", str(out), "--only", "face",
                           "--init-from", str(committed), "--budget", "2", "--cases", "2", "--first-case", "5",
                           "--seed", "11",
                           "--threads", "1", "--save-every", "1000"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "DEMO_MODELS.json").read_text())
    (face,) = record["models"]
    new = face["stages"][-1]
    assert face["stages"][:-1] == before["stages"]
    assert new["iterations"] >= 1 and new["how"].startswith("--init-from (previous stage)") and "--seed 11" in new["how"]
    assert face["iterations"] == before["iterations"] + new["iterations"]
    assert record["training_seeds"] == "5..6" and "--first-case 5" in new["how"]
    if not torch.cuda.is_available():
        assert new["machine"].startswith("1 CPU thread (")
    # the written folder is a loadable nnU-Net model whose weights moved away from the committed ones
    sm = load_catalogue().submodel("face")
    (folder,) = out.glob(f"{sm.folder_prefix}{sm.name}/*")
    (old_folder,) = committed.glob(f"{sm.folder_prefix}{sm.name}/*")
    net = load_model(folder, sm, device="cpu").predictor.network
    old = load_model(old_folder, sm, device="cpu").predictor.network
    moved = [not torch.equal(a, b) for a, b in zip(net.state_dict().values(), old.state_dict().values())]
    assert any(moved)
    assert (committed / "DEMO_MODELS.json").read_text() == committed_record  # --init-from only reads


def test_the_training_script_refuses_held_out_phantoms_as_training_data(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "training.train_demo_models", "--out", str(tmp_path / "out"),
                           "--cases", "4", "--first-case", "9999998"], cwd=root, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 2 and "leave the training seeds 0..999999" in proc.stderr
    assert not (tmp_path / "out").exists()


def _toy_cases() -> list:
    """Ten 12^3 cases: structure 1 in all, structure 2 in five, structure 9 (a 'phalanx') in one, as one voxel."""
    from training.train import Case

    cases = []
    for i in range(10):
        lab = np.zeros((12, 12, 12), np.uint8)
        lab[2:10, 2:10, 2:6] = 1
        if i % 2:
            lab[2:10, 2:10, 7:10] = 2
        if i == 3:
            lab[11, 11, 11] = 9
        flat = lab.ravel()
        voxels = {int(g): np.flatnonzero(flat == g) for g in np.unique(flat) if g}
        cases.append(Case(np.zeros(lab.shape, np.float32), {"m": lab}, voxels))
    return cases


@pytest.mark.parametrize("kind, share_of_9", [("case", (0.0, 0.06)), ("structure", (0.25, 0.42))])
def test_the_structure_first_sampler_centres_a_rare_structure_as_often_as_a_common_one(kind, share_of_9):
    from training.train import PatchSampler, _crop

    sampler = PatchSampler(_toy_cases(), kind)
    rng = np.random.default_rng(0)
    draws = [sampler.draw(rng) for _ in range(3000)]
    centred = [(case, gid) for case, gid in draws if gid is not None]
    assert 0.62 < len(centred) / len(draws) < 0.72  # both keep nnU-Net's 2/3 foreground patches
    assert all(gid in case.voxels for case, gid in centred)
    share = sum(gid == 9 for _, gid in centred) / len(centred)
    assert share_of_9[0] < share < share_of_9[1], share  # uniform over 3 structures vs 1 case in 10, then 1 of 3
    case, gid = next((c, g) for c, g in centred if g == 9)
    for _ in range(20):  # a quarter-patch jitter keeps the voxel inside the patch
        _, (lab,) = _crop(case, ["m"], (8, 8, 8), rng, structure=gid)
        assert lab.shape == (8, 8, 8) and (lab == 9).sum() == 1


def test_an_unknown_sampler_is_refused_with_the_choices():
    from training.train import PatchSampler

    with pytest.raises(ValueError, match="case, structure"):
        PatchSampler([], "rare")


def test_a_case_holds_only_its_own_voxel_indices_not_every_voxel_of_the_volume():
    """Each structure's indices are their own int32 array: 768 training phantoms fit in a 24 GB machine's memory
    (slices of the per-model argsort kept six int64 copies of every voxel alive, about 43 MB a case)."""
    from training.train import make_cases

    cat = load_catalogue()
    case = make_cases([0], 1.5, [cat.submodel("tissue_types"), cat.submodel("face")])[0]
    flat_truth = {gid: np.flatnonzero(case.labels["face"] == i) for i, gid in
                  enumerate([cat.structure_ids[n] for n in model_labels(cat.submodel("face"))], 1)}
    assert set(flat_truth) & set(case.voxels)
    for gid, idx in case.voxels.items():
        assert idx.dtype == np.int32 and idx.base is None
        if gid in flat_truth:
            np.testing.assert_array_equal(np.sort(idx), flat_truth[gid])
    held = sum(v.nbytes for v in case.voxels.values())
    assert held < case.image.size * 4  # fewer bytes than one int32 per voxel: only structure voxels are indexed


def test_phantoms_built_in_worker_processes_are_the_same_cases_in_seed_order():
    from training.train import make_cases

    cat = load_catalogue()
    sms = [cat.submodel("tissue_types"), cat.submodel("face")]
    here, pooled = make_cases([0, 1], 1.5, sms), make_cases([0, 1], 1.5, sms, workers=2)
    assert len(pooled) == 2
    for a, b in zip(here, pooled):
        np.testing.assert_array_equal(a.image, b.image)
        assert a.labels.keys() == b.labels.keys() and a.voxels.keys() == b.voxels.keys()
        for name in a.labels:
            np.testing.assert_array_equal(a.labels[name], b.labels[name])
        for gid in a.voxels:
            np.testing.assert_array_equal(a.voxels[gid], b.voxels[gid])
    assert not np.array_equal(here[0].image, here[1].image)


def test_batches_cut_ahead_in_a_thread_train_exactly_as_batches_cut_inline(tmp_path):
    """Same losses over the first two iterations (the learning rate follows the clock after that);
    another sampling seed gives other ones, so the comparison can tell batches apart."""
    from training.train import make_cases, train_models

    cat = load_catalogue()
    sms = [cat.submodel("tissue_types"), cat.submodel("face")]
    cases = make_cases([0], 1.5, sms)

    def loss(out: str, prefetch: int, seed: int = 2) -> float:
        return train_models(sms, cases, tmp_path / out, seconds=120, spec=SPEC, max_iters=2, seed=seed,
                            save_every_s=1e9, prefetch=prefetch)[0]["final_loss"]

    inline = loss("inline", 0)
    assert loss("ahead", 2) == inline
    assert loss("other", 2, seed=3) != inline


def test_a_failure_while_cutting_patches_ahead_reaches_the_training_loop():
    from training.train import _prefetched

    def source():
        yield 1
        raise ValueError("bad patch")

    items = _prefetched(source(), 2)
    assert next(items) == 1
    with pytest.raises(ValueError, match="bad patch"):
        next(items)


# -- mirroring the trained weights (issue 35: the phantoms' left and right were fixed) --------------------------
def test_the_network_sees_the_patients_left_and_right_along_its_last_axis():
    """A phantom as training (and ``serve.inference.predict``) hands it to the network: each left/right pair lies
    apart along NETWORK_LR_AXIS, the ``_left`` one at low indices (RAS+ x grows toward the patient's right)."""
    from training.train import NETWORK_LR_AXIS, make_case

    cat = load_catalogue()
    sms = [cat.submodel("organs"), cat.submodel("muscles")]
    case = make_case(0, 1.5, sms)
    pairs = 0
    for sm in sms:
        labels = list(model_labels(sm))
        for base in ("kidney", "lung", "femur", "hip", "humerus", "autochthon", "iliopsoas"):
            if f"{base}_left" not in labels:
                continue
            left, right = (np.argwhere(case.labels[sm.name] == labels.index(f"{base}_{side}") + 1).mean(0)
                           for side in ("left", "right"))
            gap = right - left
            assert np.argmax(np.abs(gap)) == NETWORK_LR_AXIS and gap[NETWORK_LR_AXIS] > 0, (base, gap)
            pairs += 1
    assert pairs == 7


def _mirror_test_net(strides=None):
    torch.manual_seed(0)
    spec = UNetSpec(features=(4, 8, 16), patch_size=(16, 16, 32), strides=strides)
    return build_network(make_plans("Dataset850_mirror", 1.5, spec), make_dataset_json(["a", "b", "c"])).eval()


def _smooth_inputs(n: int, seed: int) -> np.ndarray:
    from scipy import ndimage

    rng = np.random.default_rng(seed)  # smooth, as images and feature maps are, so a voxel's neighbours say much of it
    return np.stack([ndimage.gaussian_filter(rng.normal(size=(16, 16, 32)), 1.5) * 5 for _ in range(n)]
                    )[:, None].astype(np.float32)


def test_flipped_kernels_mirror_a_network_without_strides_exactly_and_twice_restore_it():
    import copy

    from training.train import mirror_kernels_

    net = _mirror_test_net(strides=[[1, 1, 1]] * 3)
    flipped = copy.deepcopy(net)
    mirror_kernels_(flipped, 2)
    x = torch.from_numpy(_smooth_inputs(2, 1))
    with torch.no_grad():
        torch.testing.assert_close(flipped(x.flip(4)).flip(4), net(x), atol=1e-4, rtol=1e-4)
    mirror_kernels_(flipped, 2)
    for a, b in zip(flipped.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)


def test_mirror_network_follows_the_exact_mirror_where_flipping_alone_does_not():
    """With stride-2 downsampling, flipped kernels alone put each coarser level a voxel off; moving and
    refitting the stride-2 kernels (only those) brings the output close to the exact mirror."""
    import copy

    from training.train import _strided_convs, mirror_kernels_, mirror_network

    net = _mirror_test_net()
    mirrored, fits = mirror_network(net, _smooth_inputs(16, 2))
    flipped = copy.deepcopy(net)
    mirror_kernels_(flipped, 2)
    assert len(fits) == 2 and all(f["mse_after"] < f["mse_before"] for f in fits), fits
    x = torch.from_numpy(_smooth_inputs(4, 3))  # not the patches of the fit
    with torch.no_grad():
        exact = net(x.flip(4)).flip(4)
        err = {name: float(((n(x) - exact) ** 2).mean() / exact.var())
               for name, n in (("flipped", flipped), ("mirrored", mirrored))}
        agree = {name: float((n(x).argmax(1) == exact.argmax(1)).float().mean())
                 for name, n in (("flipped", flipped), ("mirrored", mirrored))}
    assert err["mirrored"] < 0.5 * err["flipped"], err
    assert agree["mirrored"] > agree["flipped"] + 0.05, agree
    # every other layer is exactly the flipped one
    refit = {id(m) for m in _strided_convs(mirrored, 2)}
    for (name, a), b in zip(mirrored.named_modules(), flipped.modules()):
        if isinstance(a, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)) and id(a) not in refit:
            assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias), name


def test_the_training_script_mirrors_a_committed_model_and_records_a_stage_without_training(tmp_path):
    """``training/train_demo_models.py --mirror-from``, end to end on the committed face model."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from serve.inference.modelload import load_model
    from training.train import _strided_convs

    root = Path(__file__).resolve().parents[2]
    committed = root / "serve" / "demo_models"
    committed_record = (committed / "DEMO_MODELS.json").read_text()
    before = {m["model"]: m for m in json.loads(committed_record)["models"]}["face"]
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "training.train_demo_models", "--out", str(out), "--only", "face",
                           "--mirror-from", str(committed), "--cases", "2", "--first-case", "5", "--patches", "4",
                           "--seed", "3", "--threads", "1"],
                          cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (face,) = json.loads((out / "DEMO_MODELS.json").read_text())["models"]
    new = face["stages"][-1]
    assert face["stages"][:-1] == before["stages"]
    assert new["iterations"] == 0 and new["final_loss"] is None and new["how"].startswith("--mirror-from")
    assert face["iterations"] == before["iterations"] and face["final_loss"] == before["final_loss"]
    assert len(new["refit"]) == 3 and all(f["mse_after"] <= f["mse_before"] for f in new["refit"]), new["refit"]
    sm = load_catalogue().submodel("face")
    (folder,) = out.glob(f"{sm.folder_prefix}{sm.name}/*")
    (old_folder,) = committed.glob(f"{sm.folder_prefix}{sm.name}/*")
    net = load_model(folder, sm, device="cpu").predictor.network
    old = load_model(old_folder, sm, device="cpu").predictor.network
    refit = {id(m) for m in _strided_convs(net, 2)}
    for (name, a), b in zip(net.named_modules(), old.modules()):
        if isinstance(a, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)) and id(a) not in refit:
            assert torch.equal(a.weight, b.weight.flip(4)), name  # float16 weights flip exactly
    size = lambda f: (f / "fold_0" / "checkpoint_final.pth").stat().st_size  # noqa: E731
    assert abs(size(folder) - size(old_folder)) < 0.02 * size(old_folder)
    assert (committed / "DEMO_MODELS.json").read_text() == committed_record  # --mirror-from only reads
