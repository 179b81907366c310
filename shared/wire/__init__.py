"""Wire formats: the files the app writes for other datasites and readers (pydantic models), and their committed JSON
Schemas (``schemas/``).
"""
