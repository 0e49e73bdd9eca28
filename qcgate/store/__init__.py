"""The audit store: SQLAlchemy 2 models, Alembic migrations and the queries people run."""
