"""DIPC_ADMIN_PORT: DOKU's paths on the public port, the admin API and /metrics on a port of their own,
so a firewall or a NetworkPolicy can keep them apart (issue 9)."""

from __future__ import annotations

import asyncio

import aiohttp

from server.doku.client import DokuSimulator
from tests.conftest import CLIENT, CODE
from tests.integration.test_cli import free_port, wait_ready
from tests.integration.test_lifecycle import register_code, server_env, spawn


async def test_the_admin_api_and_metrics_listen_apart_from_dokus_paths(database_url, pool):
    await register_code(pool)
    public, admin = free_port(), free_port()
    server = spawn(server_env(database_url, public, DIPC_ADMIN_PORT=str(admin)))
    try:
        await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{public}/healthz", server)
        await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{admin}/readyz", server)
        auth = {"Authorization": "Bearer t"}
        async with aiohttp.ClientSession() as session:
            doku = DokuSimulator(session, f"http://127.0.0.1:{public}", CLIENT)
            assert (await doku.inquiry(CODE)).status == 200
            on_admin = DokuSimulator(session, f"http://127.0.0.1:{admin}", CLIENT)
            assert (await on_admin.inquiry(CODE)).status == 404  # DOKU's paths are not on the admin port

            for path in ("/v1/payment-codes", "/metrics"):
                hidden = await session.get(f"http://127.0.0.1:{public}{path}", headers=auth)
                assert hidden.status == 404, path
                assert (await hidden.json())["error"]["code"] == "NOT_FOUND"
                assert (await session.get(f"http://127.0.0.1:{admin}{path}", headers=auth)).status == 200, (
                    path
                )
            for path in ("/healthz", "/readyz"):  # for probes, on both
                for port in (public, admin):
                    assert (await session.get(f"http://127.0.0.1:{port}{path}")).status == 200
    finally:
        server.terminate()
        assert await asyncio.to_thread(server.wait, 30) == 0


async def test_without_an_admin_port_everything_shares_the_one_port(database_url, pool):
    port = free_port()
    server = spawn(server_env(database_url, port))
    try:
        await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{port}/readyz", server)
        async with aiohttp.ClientSession() as session:
            response = await session.get(
                f"http://127.0.0.1:{port}/v1/payment-codes", headers={"Authorization": "Bearer t"}
            )
            assert response.status == 200
            assert (await session.get(f"http://127.0.0.1:{port}/metrics")).status == 200
    finally:
        server.terminate()
        assert await asyncio.to_thread(server.wait, 30) == 0
