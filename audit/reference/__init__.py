"""The training-set ("reference") side in the LAION / clip-retrieval layout (DESIGN §3)."""
