"""The training-set ("reference") side in the LAION / clip-retrieval layout (docs/architecture.md, "Contracts")."""
