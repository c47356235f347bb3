"""RoleHost: roles start and stop independently; a stopped role's service has fully ended."""

import pytest
import trio

from p2pnn.work.roles import RoleHost


async def test_roles_start_and_stop_independently(nursery):
    log: list[str] = []

    def service(name):
        async def run(*, task_status=trio.TASK_STATUS_IGNORED):
            log.append(f"{name} up")
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await trio.sleep(0.01)  # a clean stop takes time (a Ki hands tasks back)
                log.append(f"{name} down")
        return run

    host = RoleHost({"principal": service("principal"), "ki": service("ki")})
    await nursery.start(host.run)
    await host.assume({"principal", "an", "ki"})
    assert host.roles == {"principal", "an", "ki"}
    assert sorted(log) == ["ki up", "principal up"]
    await host.assume({"ki"})
    assert host.roles == {"ki"}
    assert log[-1] == "principal down"  # stopped before assume returned
    await host.assume({"ki", "principal"})
    assert log.count("principal up") == 2 and log.count("ki up") == 1


async def test_unknown_roles_are_refused(nursery):
    with pytest.raises(ValueError, match="boss"):
        RoleHost({"boss": lambda: None})
    host = RoleHost({})
    await nursery.start(host.run)
    with pytest.raises(ValueError, match="leader"):
        await host.assume({"leader"})
