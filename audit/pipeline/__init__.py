"""The Ray wiring: the one package that knows about Ray (DESIGN §5). Stages stay Ray-free."""

from audit.pipeline.audit import AuditResult, GenerationReport, run_audit
from audit.pipeline.ray_setup import LOOPBACK, connect

__all__ = ["LOOPBACK", "AuditResult", "GenerationReport", "connect", "run_audit"]
