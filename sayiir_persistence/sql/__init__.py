"""The SQLAlchemy Core backend and its schema."""
