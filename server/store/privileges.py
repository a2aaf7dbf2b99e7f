"""What the serving role may do: read and write rows, never change the schema.

Migrations run as the schema's owner (``dipc migrate``); ``dipc serve`` runs as a role that only needs
row privileges. This module answers "is the connected role enough?" for ``doctor`` and for ``serve``'s
start, so a missing GRANT is a clear message at start instead of a permission error on the first payment.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from server.store.migrate import LEDGER_TABLE

ROW_PRIVILEGES = "SELECT, INSERT, UPDATE, DELETE"


@dataclass(frozen=True, slots=True)
class RoleReport:
    role: str
    missing: list[str]  # "INSERT on payments", … — empty when the role can serve
    superuser: bool
    can_change_schema: bool  # owns a table or may CREATE in the schema: more than serving needs

    @property
    def sufficient(self) -> bool:
        return not self.missing


async def check(conn: asyncpg.Connection) -> RoleReport:
    """What the connected role lacks for serving, over every table, sequence and function dipc made."""
    rows = await conn.fetch(
        """
        SELECT c.relname AS name, c.relkind::text AS kind,
               pg_get_userbyid(c.relowner) = current_user AS owned,
               has_table_privilege(c.oid, 'SELECT') AS can_select,
               has_table_privilege(c.oid, 'INSERT') AS can_insert,
               has_table_privilege(c.oid, 'UPDATE') AS can_update,
               has_table_privilege(c.oid, 'DELETE') AS can_delete,
               CASE WHEN c.relkind = 'S' THEN has_sequence_privilege(c.oid, 'USAGE') END AS can_use
          FROM pg_class c
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'S')
         ORDER BY c.relname
        """
    )
    missing: list[str] = []
    for row in rows:
        name = row["name"]
        if row["kind"] == "S":
            if not row["can_use"]:
                missing.append(f"USAGE on sequence {name}")
            continue
        wanted = ("SELECT",) if name == LEDGER_TABLE else tuple(ROW_PRIVILEGES.split(", "))
        missing += [f"{what} on {name}" for what in wanted if not row[f"can_{what.lower()}"]]
    # Functions dipc calls (dipc_inquire answers every inquiry, dipc_payment_context_by_source starts every
    # notification); trigger functions are not called.
    functions = await conn.fetch(
        """
        SELECT p.proname AS name
          FROM pg_proc p
          JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = current_schema() AND p.prokind = 'f'
           AND p.prorettype <> 'trigger'::regtype AND NOT has_function_privilege(p.oid, 'EXECUTE')
         ORDER BY p.proname
        """
    )
    missing += [f"EXECUTE on function {row['name']}" for row in functions]
    facts = await conn.fetchrow(
        """
        SELECT current_user AS role,
               (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS superuser,
               has_database_privilege(current_database(), 'TEMPORARY') AS can_temp,
               has_schema_privilege(current_schema(), 'CREATE') AS can_create
        """
    )
    if not facts["can_temp"]:
        # Bulk imports stage their rows in a temporary table before they are checked and inserted.
        missing.append("TEMPORARY on the database")
    return RoleReport(
        role=facts["role"],
        missing=missing,
        superuser=bool(facts["superuser"]),
        can_change_schema=bool(facts["can_create"]) or any(row["owned"] for row in rows),
    )
