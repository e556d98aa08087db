"""llamacluster's model server: a vLLM engine inside a Ray Serve deployment with an OpenAI API."""
