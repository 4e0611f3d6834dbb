"""The catalogue's schema migrations (Alembic): ``SqlCatalogue`` runs them to head when it opens a database.

By hand, for a developer writing the next revision (the database URL never comes from the ini file)::

    alembic -c appliance/trainer/migrations/alembic.ini -x url=sqlite:////tmp/catalogue.db upgrade head
    alembic -c appliance/trainer/migrations/alembic.ini -x url=... revision --autogenerate --rev-id 0002 -m "..."
"""
