"""Function-preserving widening of a trained trunk (training.widen), alone and through ``train_models(init_from=...)``."""

from __future__ import annotations

import pytest
import torch

from serve.catalogue import load_catalogue
from serve.inference.modelfolder import UNetSpec, build_network, make_dataset_json, make_plans, write_model_folder
from training.train import _head_state, _heads, model_labels, train_models
from training.widen import widen_into

# demo-model training, not serving: left out of the default run (make test-training)
pytestmark = pytest.mark.training

NARROW = UNetSpec(features=(4, 8, 16), patch_size=(16, 16, 16))
WIDE = UNetSpec(features=(6, 16, 24), patch_size=(16, 16, 16))


def _net(spec: UNetSpec, n_out: int = 5, seed: int = 0):
    torch.manual_seed(seed)
    return build_network(make_plans("Dataset925_x", 1.5, spec), make_dataset_json([f"c{i}" for i in range(1, n_out)]),
                         deep_supervision=True)


def test_a_widened_network_computes_what_the_narrow_one_did_at_every_output():
    narrow, wide = _net(NARROW, seed=1), _net(WIDE, seed=2)
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        before_wide = wide.eval()(x)[0].clone()
        widen_into(narrow, wide)
        want, got = narrow.eval()(x), wide(x)
    assert len(got) == len(want) == 2  # the deep-supervision output too
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(before_wide, got[0], atol=1e-2)  # the copy did change the wide network
    # the new channels exist and are live: their own weights are not zero, only those into old channels
    conv = wide.encoder.stages[0][0].convs[0].conv
    assert conv.weight[4:].abs().sum() > 0
    nxt = wide.encoder.stages[0][0].convs[1].conv
    assert nxt.weight[:4, 4:].abs().sum() == 0 and nxt.weight[4:, 4:].abs().sum() > 0


def test_widening_trains_the_new_channels():
    narrow, wide = _net(NARROW, seed=1), _net(WIDE, seed=2)
    widen_into(narrow, wide)
    wide.train()
    out = wide(torch.randn(1, 1, 16, 16, 16))[0]
    out.square().mean().backward()
    seg = wide.decoder.seg_layers[-1].weight  # full-resolution head: reads 6 channels, 4 of them old
    assert seg.grad[:, 4:].abs().sum() > 0


def test_widening_into_a_narrower_or_different_network_is_refused():
    with pytest.raises(ValueError, match="cannot widen"):
        widen_into(_net(WIDE), _net(NARROW))
    with pytest.raises(ValueError, match="no matching layer"):
        widen_into(_net(NARROW), _net(UNetSpec(features=(4, 8, 16, 32), patch_size=(16, 16, 16))))
    with pytest.raises(ValueError, match="no matching layer in the wider"):
        widen_into(_net(UNetSpec(features=(4, 8, 16, 32), patch_size=(16, 16, 16))), _net(WIDE))


def test_train_models_widens_a_narrower_init_from_and_the_exported_models_agree(tmp_path):
    """``--init-from`` with a narrower committed trunk: zero iterations export wide folders that predict as before."""
    from serve.inference.modelload import load_model

    cat = load_catalogue()
    sms = [cat.submodel("tissue_types"), cat.submodel("face")]
    heads = _heads(sms)
    n_out = sum(n for _, _, n in heads)
    trunk = _net(NARROW, n_out, seed=3)
    for sm, (_, c0, n) in zip(sms, heads):
        write_model_folder(tmp_path / "narrow", sm, NARROW, labels=model_labels(sm),
                           state_dict=_head_state(trunk.state_dict(), c0, n))
    run = train_models(sms, [], tmp_path / "wide", seconds=60, spec=WIDE, max_iters=0,
                       init_from=tmp_path / "narrow")
    assert [(r["widened_from"], r["widened_to"]) for r in run] == [([4, 8, 16], [6, 16, 24])] * 2
    x = torch.randn(1, 1, 16, 16, 16)
    for sm in sms:
        folders = {k: next((tmp_path / k).glob(f"{sm.folder_prefix}{sm.name}/*")) for k in ("narrow", "wide")}
        nets = {k: load_model(f, sm, device="cpu").predictor.network.eval() for k, f in folders.items()}
        assert nets["wide"].encoder.stages[0][0].convs[0].conv.out_channels == 6
        with torch.no_grad():
            torch.testing.assert_close(nets["wide"](x), nets["narrow"](x), atol=1e-4, rtol=1e-4)
