"""Layers shared by every model: Dense/norms with logical axes, attention dispatch, rotary helpers, block stacks."""
