"""The ITEM detector as a library: decode → caption → ground → embed → misalign → head.

Knows nothing of Celery, SQL, Redis or HTTP. Start at `pipeline.detector.Detector`.
"""
