"""ControlNet fine-tuning on (condition, target) volume pairs with the base model frozen.

Target latents are pre-computed with the frozen autoencoder; the loss is the official
epsilon-prediction loss (L1, or L2). Runs as one process or under ``torchrun`` (DDP; gloo on CPU,
NCCL on CUDA): every rank draws the same global batch, sample times and noise from one seeded
generator and keeps its own slice, so N processes give the same weights as one process with the
same global batch. Checkpoints hold everything needed for an exact resume.
"""
from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..conditioning import make_hint
from ..data.grid import apply_affine, random_affine_theta, resample, working_grid
from ..data.volumes import DETACHED_SUFFIXES, SUFFIXES, hu_to_model, percentile_normalize, read_volume
from ..errors import UserError
from ..io.atomic import atomic_path
from ..io.checkpoints import fingerprint, save_model
from ..models.config import init_args
from ..models.controlnet import ControlNet, control_scales_list, controlled_noise, init_from_base
from ..pipelines.generation import GenerationPipeline
from ..schedulers import GaussianDiffusion
from .diffusion import EMA


@dataclass
class TrainConfig:
    task: str                              # sparse-view | labels | mri
    out: str
    model: str | None = None               # base registry id
    weights: str | None = None             # or a base weights folder
    class_index: int | None = None
    spacing_xyz: list[float] | None = None
    label_values: list[int] | None = None  # labels task: values (channel order), 0 = background
    label_mode: str = "nearest"
    hu_window: list[float] | None = None   # CT image tasks and targets
    steps: int = 1000
    batch: int = 4                         # global batch (split over processes)
    lr: float = 1e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    loss: str = "l1"
    ema_decay: float = 0.999
    seed: int = 0
    ckpt_every: int = 500
    val_every: int = 250
    augment: int = 0                       # random affine copies per training pair
    control_scale: float = 1.0
    stop_after: int | None = None          # stop early (simulates an interruption; resume continues)


class DataError(UserError):
    """Training pairs that are missing, unpaired or mis-sized (the message names the files)."""


def find_pairs(source: str | Path) -> list[tuple[Path, Path]]:
    """Pairs from a folder with ``condition/`` and ``target/`` sub-folders (matched by file name)
    or a CSV with ``condition,target`` columns (paths relative to the CSV)."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        with open(source, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or not {"condition", "target"} <= set(rows[0]):
            raise DataError(f"{source}: CSV needs 'condition' and 'target' columns")
        pairs = [((source.parent / r["condition"]).resolve(), (source.parent / r["target"]).resolve()) for r in rows]
        missing = [str(p) for pair in pairs for p in pair if not p.exists()]
        if missing:
            raise DataError(f"{source}: files not found: {', '.join(missing[:5])}")
        return pairs
    cdir, tdir = source / "condition", source / "target"
    if not cdir.is_dir() or not tdir.is_dir():
        raise DataError(f"{source}: expected sub-folders condition/ and target/ (or a CSV file)")

    def volumes(d: Path) -> dict[str, Path]:
        return {p.name: p for p in sorted(d.iterdir()) if p.name.lower().endswith(SUFFIXES + DETACHED_SUFFIXES)}  # detached: refused clearly on read

    cond, targ = volumes(cdir), volumes(tdir)
    only_c, only_t = sorted(set(cond) - set(targ)), sorted(set(targ) - set(cond))
    if only_c or only_t:
        raise DataError(f"{source}: unpaired files: condition only {only_c}, target only {only_t}")
    if not cond:
        raise DataError(f"{source}: no volumes found")
    return [(cond[n], targ[n]) for n in sorted(cond)]


class ControlNetTrainer:
    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend)
        if cfg.batch % self.world:
            raise UserError(f"global batch {cfg.batch} must be divisible by the number of processes {self.world}")
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        self.base = GenerationPipeline.from_pretrained(cfg.model, cfg.weights, device=device)
        self.base.net.requires_grad_(False)
        self.base.ae.requires_grad_(False)
        self.device = self.base.device
        entry = self.base.entry
        self.class_index = cfg.class_index if cfg.class_index is not None else (
            entry.default_class if entry else 1)
        if cfg.spacing_xyz is None and entry is not None:
            cfg.spacing_xyz = entry.default_size(self.class_index)[1]
        if cfg.hu_window is None and entry is not None:
            cfg.hu_window = entry.hu_window(self.class_index)
        self.meta = self._meta()

    # -- task recipe ------------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.task == "labels":
            if not cfg.label_values:
                raise UserError("the labels task needs --label-values (e.g. 0 1 2 3 4)")
            hint = {"type": "labels", "values": [int(v) for v in cfg.label_values], "mode": cfg.label_mode}
        elif cfg.task == "sparse-view":
            hint = {"type": "image", "normalize": "hu_window", "hu_window": list(cfg.hu_window or (-1000.0, 1000.0))}
        elif cfg.task == "mri":
            hint = {"type": "image", "normalize": "percentile"}
        else:
            raise UserError(f"unknown task {cfg.task!r}; use sparse-view, labels or mri")
        return {"task": cfg.task, "hint": hint, "class": self.class_index, "control_scale": cfg.control_scale,
                "base_model": self.base.entry.id if self.base.entry else None,
                "base_fingerprint": fingerprint(self.base.net), "spacing_xyz": cfg.spacing_xyz,
                "output": "hu" if cfg.task != "mri" else "model", "hu_window": cfg.hu_window}

    def _controlnet(self) -> ControlNet:
        c = self.base.net.config
        hint_ch = len(self.meta["hint"]["values"]) if self.meta["hint"]["type"] == "labels" else c["channels"]
        cn = ControlNet(**init_args(ControlNet, c, hint_channel=hint_ch, dit_branch=self.meta["hint"]["type"] == "image"))
        init_from_base(cn, self.base.net)  # official initialisation from the frozen base
        return cn.to(self.device)

    # -- data -----------------------------------------------------------------------------------------------
    def _target_model_units(self, arr: np.ndarray) -> np.ndarray:
        if self.cfg.task == "mri":
            return percentile_normalize(arr)[0]
        lo, hi = self.meta["hu_window"] or (-1000.0, 1000.0)
        return hu_to_model(arr, lo, hi)

    def prepare(self, pairs: list[tuple[Path, Path]], augment: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0 latents, hints) for every pair and augmented copy, on the working grid."""
        g = torch.Generator().manual_seed(seed)
        lats, hints = [], []
        for cond_path, targ_path in pairs:
            cond, targ = read_volume(cond_path), read_volume(targ_path)
            if cond.shape != targ.shape or not np.allclose(cond.affine, targ.affine, atol=1e-3):
                raise DataError(f"{cond_path.name}: condition grid {cond.shape} does not match target "
                                f"{targ_path.name} grid {targ.shape} (same size and geometry needed)")
            tc, cc = targ.canonical(), cond.canonical()
            spacing = self.cfg.spacing_xyz or tc.spacing
            grid = working_grid(tc, spacing, self.base.compression)
            t_work = resample(torch.from_numpy(tc.to_network().astype(np.float32)), grid.shape_dhw, "image")
            kind = "labels" if self.meta["hint"]["type"] == "labels" else "image"
            c_src = torch.from_numpy(np.ascontiguousarray(cc.to_network()))
            c_work = resample(c_src if kind == "labels" else c_src.float(), grid.shape_dhw, kind)
            variants = [(t_work, c_work)]
            for _ in range(augment):
                theta = random_affine_theta(g)
                variants.append((apply_affine(t_work, theta), apply_affine(c_work, theta, "nearest" if kind == "labels"
                                                                           else "bilinear")))
            for t_arr, c_arr in variants:
                x = torch.from_numpy(self._target_model_units(t_arr.numpy()))[None, None].to(self.device)
                with torch.no_grad():
                    lats.append(self.base.ae.normalize_latent(self.base.ae.patch_encode(x)).cpu())
                    hints.append(make_hint(self.base.ae, self.meta["hint"], c_arr, self.device).cpu())
        shapes = {tuple(x.shape) for x in lats}
        if len(shapes) != 1:
            raise DataError(f"training volumes map to different latent sizes {sorted(shapes)}; resample them to one "
                            "field of view or train per size")
        return torch.cat(lats), torch.cat(hints)

    # -- training ---------------------------------------------------------------------------------------------
    def fit(self, train_pairs: list[tuple[Path, Path]], val_pairs: list[tuple[Path, Path]] | None = None,
            resume: bool = True) -> dict[str, Any]:
        cfg = self.cfg
        out = Path(cfg.out)
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        lat, hint = self.prepare(train_pairs, cfg.augment, cfg.seed)
        val = self.prepare(val_pairs, 0, cfg.seed + 1) if val_pairs else None
        torch.manual_seed(cfg.seed)
        cn = self._controlnet()
        model = cn
        if self.world > 1:
            model = torch.nn.parallel.DistributedDataParallel(cn, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        scales = control_scales_list(cfg.control_scale, cn)
        params = [p for p in cn.parameters() if p.requires_grad]
        opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg.optimizer]
        opt = opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        ema = EMA(cn, cfg.ema_decay)
        gen = torch.Generator().manual_seed(cfg.seed)
        gd = GaussianDiffusion(device=self.device)
        step, history = 0, {"loss": [], "val": []}
        ckpt_path = out / "checkpoint.pt"
        if resume and ckpt_path.exists():
            state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
            cn.load_state_dict(state["controlnet"])
            ema.shadow.load_state_dict(state["ema"])
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
            step, history = int(state["step"]), state["history"]
            self.log(f"resumed from {ckpt_path} at step {step}")
        y_all = torch.full((cfg.batch,), self.class_index, dtype=torch.long)
        res = torch.tensor(lat.shape[2:], dtype=torch.float32, device=self.device) / 64.0
        if val is not None and step == 0:
            history["val"].append([0, self.validate(ema.shadow, val, gd, res)])
        per_rank = cfg.batch // self.world
        lo, hi = self.rank * per_rank, (self.rank + 1) * per_rank
        use_amp = self.device.type == "cuda"
        t0, start_step = time.time(), step
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, initial=step, unit="step", desc="controlnet", disable=self.rank != 0)
        while step < cfg.steps:
            idx = torch.randint(lat.shape[0], (cfg.batch,), generator=gen)
            t = torch.randint(0, gd.num_timesteps, (cfg.batch,), generator=gen)
            noise = torch.randn((cfg.batch, *lat.shape[1:]), generator=gen)
            x0, h = lat[idx][lo:hi].to(self.device), hint[idx][lo:hi].to(self.device)
            tt, nn_, yy = t[lo:hi].to(self.device), noise[lo:hi].to(self.device), y_all[lo:hi].to(self.device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                xt = gd.q_sample(x0, tt, nn_)
                pred = controlled_noise(self.base.net, model, scales, xt, tt, h, yy, res)
            pred = pred.float()
            loss = F.l1_loss(pred, nn_) if cfg.loss == "l1" else F.mse_loss(pred, nn_)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(cn)
            step += 1
            history["loss"].append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(history['loss'][-20:]):.4f}")
            if val is not None and (step % cfg.val_every == 0 or step == cfg.steps):
                history["val"].append([step, self.validate(ema.shadow, val, gd, res)])
                self.log(f"step {step}: validation loss {history['val'][-1][1]:.4f}")
            if self.rank == 0 and (step % cfg.ckpt_every == 0 or step == cfg.steps or step == cfg.stop_after):
                with atomic_path(ckpt_path) as tmp:
                    torch.save({"controlnet": cn.state_dict(), "ema": ema.shadow.state_dict(),
                                "optimizer": opt.state_dict(), "generator": gen.get_state(), "step": step,
                                "history": history, "config": json.loads(json.dumps(asdict(cfg)))}, tmp)
            if cfg.stop_after is not None and step >= cfg.stop_after:
                break
        bar.close()
        result = {"steps": step, "seconds": time.time() - t0, "steps_run": step - start_step,
                  "final_loss": float(np.mean(history["loss"][-50:])) if history["loss"] else None,
                  "validation": history["val"]}
        if self.rank == 0 and step >= cfg.steps:
            save_model(ema.shadow, out / "controlnet", meta=dict(self.meta, training=dict(asdict(cfg), **result)))
        if self.world > 1:
            torch.distributed.barrier()
        return result

    @torch.no_grad()
    def validate(self, model: ControlNet, val: tuple[torch.Tensor, torch.Tensor], gd: GaussianDiffusion,
                 res: torch.Tensor) -> float:
        """Mean epsilon loss at t in {100, 400, 700} with fixed noise (deterministic)."""
        lat, hint = val
        g = torch.Generator().manual_seed(1234)
        losses = []
        for t_val in (100, 400, 700):
            noise = torch.randn(lat.shape, generator=g)
            t = torch.full((lat.shape[0],), t_val, dtype=torch.long)
            x0, h, nz, tt = lat.to(self.device), hint.to(self.device), noise.to(self.device), t.to(self.device)
            y = torch.full((lat.shape[0],), self.class_index, dtype=torch.long, device=self.device)
            xt = gd.q_sample(x0, tt, nz)
            pred = controlled_noise(self.base.net, model, control_scales_list(self.cfg.control_scale, model), xt, tt, h,
                                    y, res)
            losses.append(float(F.l1_loss(pred, nz)))
        return float(np.mean(losses))


__all__ = ["TrainConfig", "ControlNetTrainer", "find_pairs", "DataError"]
