"""The ITEM method as a library, in two parts that import only downwards:

    pipeline.core  the detector: decoding, phrases, stages, misalignment, head, profiles, model folders
    pipeline.lab   experiments on top of it: datasets, feature cache, training, evaluation, calibration, plots

Knows nothing of Celery, SQL, Redis or HTTP. Start at `pipeline.core.detector.Detector`.
"""
