"""The ITEM detector: untrusted bytes → caption → grounded objects → CLIP misalignment → P(AI-generated).

Everything a service or a notebook needs to score images, and nothing of datasets or training (`pipeline.lab`).
"""
