"""Old name of :mod:`stlm_deploy.files`, kept so code written against it keeps importing.

Nothing is defined here: every name is the one in ``stlm_deploy.files``.
"""
from .files import *  # noqa: F401,F403
from .files import __all__  # noqa: F401
