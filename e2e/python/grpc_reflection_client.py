#!/usr/bin/env python3
"""Discovers and calls a gpuswap supervisor with Python grpcio, knowing nothing of
gpuswap beforehand: the schema comes from the server's reflection service.

Prints one JSON object with what it saw; the Rust test (e2e/tests/it/clients_grpcio.rs)
asserts on it. Exits non-zero when a call fails, with the traceback on stderr.

grpcio-reflection's own client speaks only the v1alpha protocol; the messages
of v1 are the same, so this script sends them to the v1 service by its method
path, and reports separately whether v1alpha answers.
"""

import argparse
import json
import sys

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

REFLECTION_V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
REFLECTION_V1ALPHA = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


def reflect(channel, method, request):
    """One request on a reflection stream; its response."""
    call = channel.stream_stream(
        method,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    (response,) = list(call(iter([request]), timeout=60))
    if response.HasField("error_response"):
        raise RuntimeError(f"reflection error: {response.error_response}")
    return response


def services(channel, method):
    response = reflect(channel, method, reflection_pb2.ServerReflectionRequest(list_services=""))
    return sorted(s.name for s in response.list_services_response.service)


def pool_for(channel, symbol):
    """A descriptor pool with the file that defines `symbol` and its imports."""
    response = reflect(
        channel, REFLECTION_V1, reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
    )
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in response.file_descriptor_response.file_descriptor_proto
    ]
    pool = descriptor_pool.DescriptorPool()
    added = set()
    # The server may send a file before its imports: add each once its imports are in.
    while len(added) < len(files):
        progress = False
        for file in files:
            if file.name not in added and all(d in added for d in file.dependency):
                pool.Add(file)
                added.add(file.name)
                progress = True
        if not progress:
            raise RuntimeError(f"reflection sent files with missing imports: {[f.name for f in files]}")
    return pool


def call_unary(channel, pool, service, method, request_json):
    """Calls service/method with a JSON request, both message types from reflection."""
    descriptor = pool.FindServiceByName(service).FindMethodByName(method)
    request_class = message_factory.GetMessageClass(descriptor.input_type)
    response_class = message_factory.GetMessageClass(descriptor.output_type)
    call = channel.unary_unary(
        f"/{service}/{method}",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    request = json_format.Parse(request_json, request_class())
    return json_format.MessageToDict(call(request, timeout=60))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--socket", required=True, help="the supervisor's Unix socket")
    args = parser.parse_args()

    results = {"grpcio_version": grpc.__version__}
    # grpcio sends the socket's path as the HTTP/2 :authority, which the h2
    # server under tonic rejects (RST_STREAM PROTOCOL_ERROR): name localhost.
    options = [("grpc.default_authority", "localhost")]
    with grpc.insecure_channel(f"unix:{args.socket}", options=options) as channel:
        results["services"] = services(channel, REFLECTION_V1)
        try:
            results["v1alpha"] = {"services": services(channel, REFLECTION_V1ALPHA)}
        except grpc.RpcError as error:
            results["v1alpha"] = {"error": error.code().name}

        pool = pool_for(channel, "gpuswap.v1.Supervisor")
        service = pool.FindServiceByName("gpuswap.v1.Supervisor")
        results["methods"] = sorted(m.name for m in service.methods)
        results["status"] = call_unary(channel, pool, "gpuswap.v1.Supervisor", "Status", "{}")
        try:
            call_unary(
                channel, pool, "gpuswap.v1.Supervisor", "Deactivate", '{"model": "nobody-configured-this"}'
            )
            results["unknown_model"] = "OK"
        except grpc.RpcError as error:
            results["unknown_model"] = error.code().name

        health = health_pb2_grpc.HealthStub(channel)
        results["health"] = {
            name: health_pb2.HealthCheckResponse.ServingStatus.Name(
                health.Check(health_pb2.HealthCheckRequest(service=name), timeout=60).status
            )
            for name in ["", "gpuswap.v1.Supervisor"]
        }
    json.dump(results, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
