"""Server reflection that answers every symbol grpcurl asks for.

grpcio-reflection looks symbols up with DescriptorPool.FindFileContainingSymbol,
which finds services, messages, fields and enums but not a service's methods
(`twofactor.v1.TwoFactorService.Verify`, what `grpcurl describe` of a method
sends; upstream grpc/grpc#34743) nor an enum's values by their nested name.
The servicer is given a pool that falls back to the parent symbol when the
parent really has that child.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor, descriptor_pool
from grpc_reflection.v1alpha import reflection

SERVICE_NAME = reflection.SERVICE_NAME


class _SymbolPool:
    """The default descriptor pool, with method and nested enum-value symbols resolved too."""

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self._pool = pool

    def FindFileContainingSymbol(self, symbol: str) -> descriptor.FileDescriptor:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            parent, _, child = symbol.rpartition(".")
            if parent and child in self._children(parent):
                return self._pool.FindFileContainingSymbol(parent)
            raise

    def _children(self, parent: str) -> set[str]:
        """Names of the methods of a service, or the values of an enum, called `parent` (else none)."""
        try:
            return set(self._pool.FindServiceByName(parent).methods_by_name)
        except KeyError:
            pass
        try:
            return set(self._pool.FindEnumTypeByName(parent).values_by_name)
        except KeyError:
            return set()

    def __getattr__(self, name: str) -> Any:  # every other lookup as the pool does it
        return getattr(self._pool, name)


def enable_server_reflection(service_names: tuple[str, ...], server: grpc.Server) -> None:
    pool: Any = _SymbolPool(descriptor_pool.Default())
    reflection.enable_server_reflection(service_names, server, pool=pool)
