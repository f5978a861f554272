"""Forward SDEs: VP, subVP and VE behind one :class:`SDE` base."""

from scoreflow.sde.base import SDE
from scoreflow.sde.ve import VESDE
from scoreflow.sde.vp import VPSDE, SubVPSDE

__all__ = ["SDE", "VPSDE", "SubVPSDE", "VESDE"]
