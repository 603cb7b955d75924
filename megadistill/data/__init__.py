"""Training data: latent streams for teachers, students and critics.

``synthetic`` holds a procedural video-latent world (coloured blobs moving in straight lines)
that needs no files and no downloads, so teachers can be trained and distilled on one CPU.
"""
