"""Training: phases (one loss each), the sharded train state and step, Orbax checkpoints, metrics, the loop.

``bifrost train --config configs/x.py --workdir DIR`` runs ``bifrost_jax.train.loop.main``; see ``loop.py``.
"""
