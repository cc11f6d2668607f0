"""Data sources. Each turns its storage into `smat.data.domain.Domain` objects."""
