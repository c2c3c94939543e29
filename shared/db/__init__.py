"""Storage: SQLAlchemy async models, engine set-up and Alembic migrations."""
