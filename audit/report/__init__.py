"""The audit report (``memaudit report``) and the comparison of two runs (``memaudit compare``)."""
