"""Ported weights as an Orbax checkpoint that training can start from (`bifrost port`).

Layout of ``out_dir``: ``variables/`` (Orbax StandardSave of the Flax variables) and ``port.json`` (the kind, the
source directory and its config.json, so the module can be rebuilt).
"""
from __future__ import annotations

import os

import orbax.checkpoint as ocp

from bifrost_jax.port.base import read_json, write_json


def save_ported(out_dir: str, kind: str, variables, source: str) -> None:
    out_dir = os.path.abspath(out_dir)
    target = os.path.join(out_dir, "variables")
    if os.path.exists(target):
        raise FileExistsError(f"{target} exists; choose an empty --out directory")
    os.makedirs(out_dir, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(target, variables)
        ckptr.wait_until_finished()
    cfg_path = os.path.join(source, "config.json")
    hf_config = read_json(cfg_path) if os.path.isfile(cfg_path) else None
    write_json(os.path.join(out_dir, "port.json"), {"kind": kind, "source": os.path.abspath(source),
                                                   "hf_config": hf_config})


def read_port_info(out_dir: str) -> dict:
    return read_json(os.path.join(out_dir, "port.json"))


def restore_ported(out_dir: str, abstract_variables=None):
    """Variables from ``out_dir``; with ``abstract_variables`` (ShapeDtypeStructs carrying shardings) they are
    restored straight into those shardings (a different mesh from the one that saved them is fine)."""
    path = os.path.join(os.path.abspath(out_dir), "variables")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} not found: not a `bifrost port` output directory")
    with ocp.StandardCheckpointer() as ckptr:
        if abstract_variables is None:
            return ckptr.restore(path)
        return ckptr.restore(path, abstract_variables)
