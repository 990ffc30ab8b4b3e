"""A XAPI pool (XCP-ng, XenServer) as a storage backend: XenAPI for records and
actions, NBD for bytes, CBT for deltas (:mod:`vdifs.storage.xapi.pool`)."""
