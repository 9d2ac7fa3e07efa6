"""Function-preserving widening of a trained PlainConvUNet (Net2Net-style, zero-initialised).

A wider network (more features per stage, same stages, kernels and outputs)
starts from a narrower trained one and computes exactly the same outputs:
every old channel keeps its weights, every new channel gets nnU-Net's random
initialisation for its own inputs, and the weights from new channels into old
ones are zero. Training then grows the new channels from there, so a demo
model's capacity can be raised without starting its training over.
"""

from __future__ import annotations


def _in_map(name: str, old_in: int, new_in: int):
    """Where each old input channel of module ``name`` sits in the wider network."""
    import torch

    # a decoder stage's first convolution reads cat(upsampled, skip): two blocks of the stage's width
    if ".stages." in name and name.startswith("decoder.") and name.split(".")[3:5] == ["convs", "0"]:
        half_old, half_new = old_in // 2, new_in // 2
        return torch.cat([torch.arange(half_old), half_new + torch.arange(half_old)])
    return torch.arange(old_in)


def widen_into(narrow, wide) -> None:
    """Copy ``narrow``'s weights into the wider network ``wide`` (same architecture class and
    stages) so that ``wide`` computes what ``narrow`` computes. ``wide`` is changed in place.

    Raises ``ValueError`` when a layer of ``wide`` is narrower than ``narrow``'s or the
    two networks differ in anything but width.
    """
    import torch

    old = dict(narrow.named_modules())
    layers = (torch.nn.Conv3d, torch.nn.ConvTranspose3d, torch.nn.InstanceNorm3d)
    names = {n for n, m in narrow.named_modules() if isinstance(m, layers)}
    wide_names = {n for n, m in wide.named_modules() if isinstance(m, layers)}
    if names - wide_names:  # a deeper narrow network would otherwise be copied stage by wrong stage
        raise ValueError(f"{sorted(names - wide_names)[0]}: no matching layer in the wider network")
    with torch.no_grad():
        for name, m in wide.named_modules():
            if name.startswith("decoder.encoder"):  # the decoder holds the encoder: widen it once
                continue
            o = old.get(name)
            if o is None or type(o) is not type(m):
                if isinstance(m, layers):
                    raise ValueError(f"{name}: no matching layer in the narrower network")
                continue
            if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
                w, w_old = m.weight, o.weight
                if isinstance(m, torch.nn.ConvTranspose3d):  # stored (in, out, *k): view it as (out, in, *k)
                    w, w_old = w.transpose(0, 1), w_old.transpose(0, 1)
                _check(name, w_old.shape, w.shape)
                ins = _in_map(name, o.in_channels, m.in_channels)
                outs = torch.arange(o.out_channels)
                w[outs[:, None], _complement(ins, m.in_channels)[None, :]] = 0  # new inputs into old outputs
                w[outs[:, None], ins[None, :]] = w_old
                if m.bias is not None:
                    m.bias[outs] = o.bias
            elif isinstance(m, torch.nn.InstanceNorm3d) and m.affine:
                _check(name, o.weight.shape, m.weight.shape)
                m.weight[: o.num_features] = o.weight
                m.bias[: o.num_features] = o.bias


def _complement(idx, n: int):
    import torch

    keep = torch.ones(n, dtype=torch.bool)
    keep[idx] = False
    return torch.nonzero(keep).flatten()


def _check(name: str, old_shape, new_shape) -> None:
    if len(old_shape) != len(new_shape) or any(a > b for a, b in zip(old_shape, new_shape)) \
            or tuple(old_shape[2:]) != tuple(new_shape[2:]):
        raise ValueError(f"{name}: cannot widen {tuple(old_shape)} into {tuple(new_shape)}")
