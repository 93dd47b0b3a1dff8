"""The saved model file: fxopt.save and fxopt.load, without pickle.

graph_json (the graph as plain JSON data and back, never running code from it),
tensor_store (weights as safetensors blobs and back), serialize (the file: header,
digest, atomic write, load checks).
"""
