"""Device meshes, multi-host initialisation and the logical-axis rules table."""
