"""A run directory's own files, besides its stages: the resolved spec the runner writes (the report reads roles
from it) and the report.

    <run>/spec.resolved.yaml
    <run>/report/report.json
    <run>/report/report.html
"""

RESOLVED_SPEC = "spec.resolved.yaml"
DIR = "report"
JSON = "report.json"
HTML = "report.html"
