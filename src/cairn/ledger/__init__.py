"""The ledger of a shared model that many contributors add knowledge to (collaborative continual learning).

The seed paper (Lee & Wynter 2024, arXiv 2410.13699) studies parties that add knowledge to one model
over time, fully cooperatively (sharing data) or semi-cooperatively (sharing only models or adapters
and a small probe set). This package keeps that model's history: a project (:mod:`.project`) with a
ledger database (:mod:`.db`, SQLAlchemy + Alembic) and a content-addressed artifact store
(:mod:`.store`, fsspec); contributions folded into releases (:mod:`.contribute`; sequentially or by
merging; by mixing into a routed LoRA-MoE, :mod:`.mix`), trained by cairn with the project's method
(:mod:`.method`, :mod:`.training`) or checked against the release they claim to build on
(:mod:`.weights`), gated against forgetting earlier probe sets (:mod:`.gate`, :mod:`.probes`,
:mod:`.old_knowledge`); text views and an HTML report (:mod:`.views`, :mod:`.report`); and the import
of finished ``cairn run`` directories (:mod:`.importer`).
"""

from cairn.ledger.project import Project, init_project, open_project

__all__ = ["Project", "init_project", "open_project"]
