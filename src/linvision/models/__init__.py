from .vrwkv import *  # noqa: F401,F403
from .vir import *  # noqa: F401,F403
from .resnas import *  # noqa: F401,F403
from .vrwkv6 import *  # noqa: F401,F403
