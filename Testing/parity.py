#!/usr/bin/env python
"""Compare MedDiffusionLib against parity files produced by the official 3D MedDiffusion code.

Usage: python Testing/parity.py [--mode reference|fast] FILE [FILE ...]

For each file (layout: ``../shared/reference/README.md``) the family is detected from its
content, the model is built from the file's ``config``, its ``state_dict`` is loaded strictly,
the main case and every ``extra_cases`` entry are run, and every output tensor in the file is
compared with the tolerances of the reference README. One line per key; exit status 1 if any
comparison fails or any output key was left uncompared. ``--mode fast`` runs the models on the
pipelines' fast kernels (oneDNN convolutions, channels-last decoder) against the same tolerances.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MedDiffusionLib.decoding import decode_official  # noqa: E402
from MedDiffusionLib.models.autoencoder import PatchVolumeAE  # noqa: E402
from MedDiffusionLib.models.biflownet import BiFlowNet  # noqa: E402
from MedDiffusionLib.models.controlnet import ControlLDM  # noqa: E402
from MedDiffusionLib.models.kernels import form_for  # noqa: E402
from MedDiffusionLib.pipelines.loop import denoise  # noqa: E402
from MedDiffusionLib.schedulers import GaussianDiffusion, ddim_timesteps, make_scheduler  # noqa: E402

# Tolerances from the reference README, section 3.
SINGLE = dict(atol=1e-4, rtol=1e-4)
DDPM_LOOP = dict(atol=1e-3, rtol=0.0)
DDIM_LOOP = dict(atol=5e-3, rtol=0.0)
BUFFER = dict(atol=1e-12, rtol=1e-6)
TINY_GAP = 1e-4  # codebook ties: index mismatches allowed only where the top-2 gap is below this

AE_ARGS = ("n_hiddens", "downsample", "image_channels", "norm_type", "num_groups", "embedding_dim", "n_codes",
           "patch_size")


MODE = {"name": "reference", "device": "cpu"}
# keys whose reference draws noise from the CPU's global RNG: a CUDA run cannot reproduce that stream
CPU_RNG_KEYS = ("sampler/ddpm_first_step_x998", "sampler/ddpm_1000_steps")


def prepare(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode on the selected device, in the selected kernels' form (the pipelines'
    recipe: :func:`~MedDiffusionLib.models.kernels.form_for`; the weights are shared)."""
    return form_for(model.eval().to(MODE["device"]), MODE["name"])


def on_device(tree: Any) -> Any:
    """``tree`` (tensors in dicts/lists) with every tensor on the selected device."""
    if isinstance(tree, torch.Tensor):
        return tree.to(MODE["device"])
    if isinstance(tree, dict):
        return {k: on_device(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(on_device(v) for v in tree)
    return tree


class Report:
    """Collects one line per compared key and tracks the keys still expected."""

    def __init__(self, label: str, expected: dict[str, Any]):
        self.label = label
        self.expected = dict(expected)
        self.failed = 0
        self.lines: list[str] = []

    def check(self, key: str, got: Any, tol: dict[str, float], note: str = "") -> None:
        ref = self.expected.pop(key)
        if MODE["device"] != "cpu" and key in CPU_RNG_KEYS:
            self.lines.append(f"skip [{self.label}] {key:<48} (the reference's noise is the CPU RNG stream)")
            return
        if isinstance(ref, torch.Tensor) and not ref.is_floating_point():
            got_t = torch.as_tensor(got).cpu()
            ok = got_t.shape == ref.shape and torch.equal(got_t.to(ref.dtype), ref)
            err = "exact" if ok else f"{int((got_t.reshape(ref.shape) != ref).sum()) if got_t.numel() == ref.numel() else 'shape'} differ"
            self._line(key, ok, f"{err:>12}", "exact", note)
            return
        if not isinstance(ref, torch.Tensor):
            ok = got == ref
            self._line(key, ok, "equal" if ok else f"got {got!r}", "exact", note)
            return
        got = got.detach().float().cpu()
        if got.shape != ref.shape:
            self._line(key, False, f"shape {tuple(got.shape)} != {tuple(ref.shape)}", "", note)
            return
        err = (got - ref).abs()
        limit = tol["atol"] + tol["rtol"] * ref.abs()
        ok = bool((err <= limit).all()) and bool(torch.isfinite(got).all())
        self._line(key, ok, f"{err.max().item():12.3e}", f"atol={tol['atol']:g} rtol={tol['rtol']:g}", note)

    def _line(self, key: str, ok: bool, err: str, tol: str, note: str) -> None:
        self.failed += not ok
        self.lines.append(f"{'ok  ' if ok else 'FAIL'} [{self.label}] {key:<48} max_abs_err={err}  {tol} {note}".rstrip())

    def finish(self) -> int:
        for key in sorted(self.expected):
            self.failed += 1
            self.lines.append(f"FAIL [{self.label}] {key:<48} NOT COMPARED")
        print("\n".join(self.lines), flush=True)
        return self.failed


@contextmanager
def capture(model: torch.nn.Module, names: list[str], prefix: str = "") -> Iterator[dict[str, torch.Tensor]]:
    """Record the output of every sub-module named in ``names`` (state-dict paths)."""
    acts: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = []
    for name in names:
        path = name[len(prefix):]
        if path in modules:
            handles.append(modules[path].register_forward_hook(
                lambda _m, _i, out, name=name: acts.__setitem__(name, out)))
    try:
        yield acts
    finally:
        for h in handles:
            h.remove()


def _flatten(prefix: str, tree: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}{k}": v for k, v in tree.items()}


def detect_family(data: dict[str, Any]) -> str:
    cfg = data.get("config", {})
    if "n_codes" in cfg and "n_hiddens" in cfg:
        return "patchvolume"
    if "control_scales" in cfg:
        return "controlnet"
    if "dim" in cfg and "dim_mults" in cfg:
        return "biflownet"
    raise ValueError("cannot tell the model family from this file's config")


# -- Patch-Volume autoencoder ------------------------------------------------------------------
def run_patchvolume(case: dict[str, Any], label: str) -> int:
    cfg = case["config"]
    ae = PatchVolumeAE(**{k: cfg[k] for k in AE_ARGS if k in cfg}).eval()
    ae.load_state_dict(case["state_dict"], strict=True)
    ae = prepare(ae)
    out = case["outputs"]
    rep = Report(label, out)
    x = on_device(case["inputs"]["x"])
    p = int(cfg["patch_size"])
    enc_keys = [k for k in out if k.startswith("enc_single_patch/")]
    dec_keys = [k for k in out if k.startswith("dec/")]
    with torch.no_grad():
        with capture(ae, enc_keys, "enc_single_patch/") as acts:
            h = ae.encode(x[..., :p, :p, :p])
        for k in enc_keys:
            rep.check(k, acts.get(k, torch.empty(0)), SINGLE)
        rep.check("enc_single_patch_h", h, SINGLE)

        lat = ae.patch_encode(x)
        rep.check("latent_patchwise", lat, SINGLE)
        ref_lat = on_device(out["latent_patchwise"])
        emb = ae.codebook.embeddings
        idx = ae.quantize(ref_lat)
        rep.check("codebook_indices", idx, {}, "(fed the reference latent)")
        rep.check("codebook_embeddings", ae.codes(idx), SINGLE)
        flat = ref_lat.movedim(1, -1).reshape(-1, emb.shape[1])
        dist = (flat ** 2).sum(1, keepdim=True) - 2 * flat @ emb.t() + (emb.t() ** 2).sum(0, keepdim=True)
        top2 = dist.topk(2, dim=1, largest=False).values
        gap = (top2[:, 1] - top2[:, 0]).reshape(idx.shape)
        rep.check("codebook_top2_gap", gap, SINGLE)

        own_idx = ae.quantize(lat).cpu()
        flips = own_idx != out["codebook_indices"]
        note = ""
        if flips.any():
            if bool((out["codebook_top2_gap"][flips] < TINY_GAP).all()):
                note = f"({int(flips.sum())} near-tie code(s) decided by the reference)"
                own_idx = torch.where(flips, out["codebook_indices"], own_idx)
            else:
                note = f"({int(flips.sum())} code(s) differ at non-tiny gaps)"
        own_idx = on_device(own_idx)
        rep.check("latent_patchwise_quantized", ae.codes(own_idx), SINGLE, note)

        lo, hi = ae.codebook_range()
        rep.check("codebook_min", lo, SINGLE)
        rep.check("codebook_max", hi, SINGLE)
        rep.check("latent_normalized", ae.normalize_latent(lat), SINGLE)
        z = ae.denormalize_latent(on_device(out["latent_normalized"]))
        rep.check("latent_denormalized", z, SINGLE)

        ref_z = on_device(out["latent_denormalized"])
        with capture(ae, dec_keys, "dec/") as acts:
            dec = ae.decode(ref_z, quantize=True)
        for k in dec_keys:
            rep.check(k, acts.get(k, torch.empty(0)), SINGLE)
        rep.check("decoded", dec, SINGLE)
        rep.check("decoded_from_indices", ae.decode(ae.quantize(ref_z), quantize=False), SINGLE)
        call = cfg.get("sliding_call") or {}
        tile = (int(call["patch_size"]) // int(call.get("compress_ratio", 8))) if call else int(cfg["sliding_latent_tile"])
        rep.check("decoded_sliding", decode_official(ae, ae.quantize(ref_z), tile), SINGLE)
        recon = ae.decode(own_idx, quantize=False)
        rep.check("forward_val_recon", recon, SINGLE, note)
    return rep.finish()


# -- BiFlowNet + sampler -------------------------------------------------------------------------
def _forward_with_hooks(model: torch.nn.Module, rep: Report, out: dict[str, Any], call: Callable[[], torch.Tensor],
                        prefix: str = "", skip: tuple[str, ...] = ()) -> torch.Tensor:
    names = [k for k in out if k not in skip and k != "eps"]
    with capture(model, names, prefix) as acts:
        eps = call()
    for k in names:
        rep.check(k, acts.get(k, torch.empty(0)), SINGLE)
    rep.check("eps", eps, SINGLE)
    return eps


def run_biflownet(case: dict[str, Any], label: str) -> int:
    net = BiFlowNet(**case["config"]).eval()
    net.load_state_dict(case["state_dict"], strict=True)
    net = prepare(net)
    inp = on_device(case["inputs"])
    expected = dict(case["outputs"])
    if "diffusion_buffers" in case:
        expected.update(_flatten("diffusion_buffers/", case["diffusion_buffers"]))
    if "sampler" in case:
        expected.update(_flatten("sampler/", case["sampler"]["outputs"]))
    rep = Report(label, expected)
    with torch.no_grad():
        _forward_with_hooks(net, rep, case["outputs"], lambda: net(inp["x"], inp["time"], inp["y"], inp["res"]))
        gd = GaussianDiffusion()
        for name, ref in case.get("diffusion_buffers", {}).items():
            rep.check(f"diffusion_buffers/{name}", gd.buffers()[name], BUFFER)
        if "sampler" in case:
            _run_sampler(net, gd, case["sampler"], rep)
    return rep.finish()


def _run_sampler(net: torch.nn.Module, gd: GaussianDiffusion, sampler: dict[str, Any], rep: Report) -> None:
    si, so = on_device(sampler["inputs"]), sampler["outputs"]
    z, y, res = si["z"], si["y"], si["res"]
    seed = int(si["torch_manual_seed_before_loop"])

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return net(x, t, y, res)

    last = gd.num_timesteps - 1
    t_last = torch.full((z.shape[0],), last, dtype=torch.long, device=z.device)

    def ddpm_first_step() -> torch.Tensor:
        torch.manual_seed(seed)
        return make_scheduler("ddpm", gd).step(fn(z, t_last), last, z).prev_sample

    def ddpm_loop() -> torch.Tensor:
        torch.manual_seed(seed)  # the official global RNG stream: no generator
        return denoise(make_scheduler("ddpm", gd), fn, z)

    handlers: dict[str, Callable[[], Any]] = {
        "eps_t999": lambda: fn(z, t_last),
        "ddpm_first_step_x998": ddpm_first_step,
        "ddpm_1000_steps": ddpm_loop,
        "ddim_timesteps": lambda: ddim_timesteps(len(so["ddim_timesteps"]), gd.num_timesteps),
        "ddim_100_steps_eta0": lambda: denoise(make_scheduler("ddim", gd, len(so.get("ddim_timesteps", range(100)))),
                                               fn, z),
    }
    tols = {"ddpm_1000_steps": DDPM_LOOP, "ddim_100_steps_eta0": DDIM_LOOP}
    for key in so:
        if key in handlers:
            rep.check(f"sampler/{key}", handlers[key](), tols.get(key, SINGLE))


# -- ControlNet -----------------------------------------------------------------------------------
def run_controlnet(case: dict[str, Any], label: str, init_ref: dict[str, Any] | None) -> int:
    cfg = case["config"]
    model = ControlLDM(**cfg).eval()
    expected = dict(case["outputs"])
    if init_ref is not None:
        expected.update(_flatten("init_from_base/", init_ref))
    rep = Report(label, expected)
    if init_ref is not None:
        got = model.init_controlnet_from_base()
        for k in init_ref:
            rep.check(f"init_from_base/{k}", sorted(got.get(k, [])), {}, "")
    model.load_state_dict(case["state_dict"], strict=True)
    model = prepare(model)
    inp = on_device(case["inputs"])
    out = case["outputs"]
    with torch.no_grad():
        controls = model.controlnet(inp["x"], inp["hint"], inp["time"], inp["y"], inp["res"])
        for i, c in enumerate(controls):
            if f"control_{i}" in out:
                rep.check(f"control_{i}", c, SINGLE)
        skip = tuple(f"control_{i}" for i in range(len(controls))) + ("eps_without_control",)
        _forward_with_hooks(model, rep, out, lambda: model(inp["x"], inp["time"], inp["hint"], inp["y"], inp["res"]),
                            skip=skip)
        if "eps_without_control" in out:
            rep.check("eps_without_control", model.noise_estimator(inp["x"], inp["time"], inp["y"], inp["res"]), SINGLE)
    return rep.finish()


def _sorted_lists(d: dict[str, Any]) -> dict[str, Any]:
    return {k: sorted(v) if isinstance(v, list) else v for k, v in d.items()}


def run_file(path: str) -> int:
    data = torch.load(path, map_location="cpu", weights_only=True)
    family = detect_family(data)
    print(f"== {path}: family {family}, {1 + len(data.get('extra_cases', []))} case(s)", flush=True)
    failed = 0
    for i, case in enumerate([data] + list(data.get("extra_cases", []))):
        label = f"{family}:{'main' if i == 0 else f'extra{i}'}"
        if family == "patchvolume":
            failed += run_patchvolume(case, label)
        elif family == "biflownet":
            failed += run_biflownet(case, label)
        else:
            init_ref = case.get("init_from_base")
            failed += run_controlnet(case, label, _sorted_lists(init_ref) if init_ref else None)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="parity_<family>.pt files")
    parser.add_argument("--mode", choices=["reference", "fast"], default="reference",
                        help="kernels to run: the plain reference path or the pipelines' fast path")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]; on CUDA the two DDPM keys drawn from the "
                                                        "CPU's RNG stream are skipped")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 in cuDNN convolutions and matmuls (CUDA)")
    args = parser.parse_args(argv)
    MODE["name"], MODE["device"] = args.mode, args.device
    if args.device.startswith("cuda"):
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32
    print(f"== kernels: {args.mode}, device {args.device}{' (TF32 allowed)' if args.tf32 else ''}", flush=True)
    total = 0
    for path in args.files:
        try:
            n = run_file(path)
        except Exception as exc:  # a broken file or model must fail loudly, never pass
            print(f"FAIL {path}: {type(exc).__name__}: {exc}", flush=True)
            n = 1
        print(f"== {path}: {'PASS' if n == 0 else f'{n} FAILED'}", flush=True)
        total += n
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
