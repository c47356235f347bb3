"""The work plane: who runs which task, and what happens when nobody does.

The An (an.py)            Dispatcher: places tasks from the shared queue on Ki
                          by free slots and capability.
The Ki (ki.py)            KiRunner: claims, runs in the worker pool, renews the
                          lease, records the outcome; KiAgent: the Ki on a
                          swarm bus (beats, cancels, attachment to an An).
Sweeps (trials.py)        SweepRunner: a sweep task's coordinator, run by the
                          Ki that claims it: makes its trials, stops the bad
                          ones early, ranks them.
The sweeper (sweeper.py)  Sweeper: re-queues lapsed leases, re-publishes
                          stranded tasks.
Roles (roles.py)          RoleHost: starts and stops each role's service as
                          the node's roles change.
"""

from p2pnn.work.an import Dispatcher, can_run
from p2pnn.work.ki import CHECKPOINT_ARTIFACT, MODEL_ARTIFACT, KiAgent, KiRunner, capabilities
from p2pnn.work.roles import ROLES, RoleHost
from p2pnn.work.sweeper import Sweeper

__all__ = ["CHECKPOINT_ARTIFACT", "MODEL_ARTIFACT", "ROLES", "Dispatcher", "KiAgent", "KiRunner", "RoleHost", "Sweeper", "can_run", "capabilities"]
