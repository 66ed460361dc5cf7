"""The ETL's schema migrations (Alembic), run by ``core/db/migrate.py`` at the start of every run.

Why migrations at all: the contract (ARCHITECTURE.md section 3) creates tables when missing and
never alters a table a user already has. A database an earlier release of this ETL set up,
however, holds tables the ETL itself created in an older shape; "create if missing" alone
would leave them behind for ever. The migrations bring exactly those tables forward, in place,
and nothing else.

The pattern every revision follows:

* Revision 1 (``r0001``) is the schema of the release at commit f2260e1, the last one without
  versioning. It creates whatever is missing from the metadata *at head*
  (``core/db/schema.py``), so a table created by any later run already has the newest shape,
  creates the id sequences above existing ids, and records which tables the ETL owns: a table
  it creates, or an existing one that an earlier release created (recognised by the ETL's own
  index names; earlier releases never added an index to a user's table).
* Each later revision brings ETL-owned tables created by an earlier release up to the next
  shape. It checks the catalog before every change, so on tables created at head it is a
  no-op, and it never touches a table that is not recorded as owned.
* User-owned tables are never altered, and neither is any table of the CDM or vocabulary
  schema (``person``, ``procedure_occurrence``, ``concept``, ...), whoever created it.

Ownership is recorded in ``dicom_etl_owned_table`` (medical-imaging schema) rather than
re-derived each time: revision 1 is the only moment where "who created this table" can be
inferred (from index names); from then on the ETL knows, because it records what it creates.
A recorded list also lets a later revision add an index without making a user's table look
like the ETL's. ``image_feature`` of an earlier release carries no index of the ETL's, so it
cannot be told apart from a user's MI-CDM ``image_feature`` and is left alone.

Adding a revision: change the metadata in ``core/db/schema.py`` (the shape of new tables),
then ``alembic.command.revision(migrate.alembic_config(None, Schemas()), "what", rev_id="0003")``
writes ``versions/r0003_what.py`` from ``script.py.mako``; write its ``upgrade()`` for owned
tables of the older shape with the helpers of ``support.py`` and set ``migrate.HEAD``. The
tests upgrade the frozen f2260e1 fixture, so a revision that breaks an old database fails there.
"""
