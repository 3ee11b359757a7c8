"""``meddiffusion models features``: feature-network weights for ``evaluate``'s Fréchet distance.

The weights of a 3-D feature network (e.g. MedicalNet's ResNet-10, which the user downloads: its
licence is theirs) are added once under a NAME, kept by the weights manager in
``MEDDIFFUSION_CACHE/features/NAME/`` with their sha256 and network, and given to ``meddiffusion
evaluate GEN REAL --feature-weights NAME`` (checked against the sha256 before every load). The
store itself is :mod:`MedDiffusionLib.evaluation.features` (``add_feature_weights``,
``feature_weights_records``, ``verify_feature_weights``, ``remove_feature_weights``); this module
is only the sub-command: :func:`add_parser` adds it to the ``models`` sub-commands, each handler
is ``args.func``. No torch is imported until a handler runs.
"""
from __future__ import annotations

import argparse

EXAMPLES = """examples:
  meddiffusion models features add medicalnet-r10 --network resnet10 --weights ~/Downloads/resnet_10.pth
  meddiffusion models features                       # list (same as `list`)
  meddiffusion models features verify medicalnet-r10
  meddiffusion evaluate generated/ real/ --feature-weights medicalnet-r10
  meddiffusion models features remove medicalnet-r10

--weights takes a .safetensors file (copied) or a PyTorch .pth/.pt state dict such as MedicalNet's
resnet_10.pth, read with torch.load(weights_only=True) (tensors only, no code runs) and stored as
safetensors. The weights are loaded into the network once before they are kept."""


def add_parser(models_sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``features`` (with ``add``, ``list``, ``verify``, ``remove``) to the ``models`` sub-commands."""
    p = models_sub.add_parser("features", help="feature-network weights for `evaluate` (Frechet distance)",
                              description="Weights of 3-D feature networks for the Frechet distance of `meddiffusion "
                                          "evaluate` (off by default),\nkept in MEDDIFFUSION_CACHE/features/NAME/ "
                                          "with their sha256 and network. Without a sub-command: list them.",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=_cmd_list)
    fsub = p.add_subparsers(dest="features_command", metavar="{add,list,verify,remove}")
    q = fsub.add_parser("add", help="add a feature network's weights under a name",
                        description="Copy (or convert) a feature network's weights into the weights manager under "
                                    "NAME, after a trial load. Example: meddiffusion models features add "
                                    "medicalnet-r10 --network resnet10 --weights resnet_10.pth")
    q.add_argument("name", help="new name (lower-case letters, digits, '.', '_', '-')")
    q.add_argument("--network", default="resnet10", help="the feature network the weights are for (built in: "
                                                         "resnet10, MedicalNet-style; default resnet10)")
    q.add_argument("--weights", required=True, metavar="FILE", help=".safetensors, or a PyTorch .pth/.pt state dict "
                                                                    "(read with weights_only=True)")
    q.add_argument("--description")
    q.set_defaults(func=_cmd_add)
    q = fsub.add_parser("list", help="added feature weights", description="List the added feature weights.")
    q.set_defaults(func=_cmd_list)
    q = fsub.add_parser("verify", help="check added feature weights against their sha256",
                        description="Check added feature weights against their recorded sha256 (all without NAME; "
                                    "exit 1 on a mismatch or a missing file).")
    q.add_argument("names", nargs="*", metavar="NAME")
    q.set_defaults(func=_cmd_verify)
    q = fsub.add_parser("remove", help="delete added feature weights", description="Delete the feature weights "
                        "added as NAME.")
    q.add_argument("name")
    q.set_defaults(func=_cmd_remove)
    return p


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.1f} MiB"


def _cmd_add(args: argparse.Namespace) -> int:
    from .evaluation.features import add_feature_weights

    rec = add_feature_weights(args.name, args.weights, network=args.network, description=args.description)
    how = "converted from" if rec["source_format"] == "pytorch" else "copied from"
    print(f"{rec['name']}: {rec['network']} weights {how} {rec['source']} into {rec['path']} "
          f"({_mib(rec['size'])}, sha256 {rec['sha256'][:16]}...); use them with `meddiffusion evaluate GEN REAL "
          f"--feature-weights {rec['name']}`")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from .evaluation.features import feature_weights_records

    records = feature_weights_records()
    if not records:
        print("no feature weights added; add some with `meddiffusion models features add NAME --network resnet10 "
              "--weights FILE`")
        return 0
    for r in records:
        print(f"{r['name']:<20} {r['network']:<10} {_mib(r.get('size')):<11} sha256 {str(r.get('sha256'))[:16]}  "
              f"{r.get('description', '')}")
        print(f"{'':<20} from {r.get('source')} ({r.get('source_format')}), added {r.get('added_at')}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .evaluation.features import feature_weights_records, verify_feature_weights

    names = args.names or [r["name"] for r in feature_weights_records()]
    if not names:
        print("no feature weights added")
        return 0
    states = []
    for name in names:
        state, detail = verify_feature_weights(name)
        states.append(state)
        print(f"{name:<20} {state:<8} {detail}")
    return 0 if all(s == "ok" for s in states) else 1


def _cmd_remove(args: argparse.Namespace) -> int:
    from .evaluation.features import remove_feature_weights

    print(f"{args.name}: removed {remove_feature_weights(args.name)}")
    return 0


__all__ = ["add_parser", "EXAMPLES"]
