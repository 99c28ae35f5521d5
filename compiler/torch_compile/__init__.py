"""`torch.compile(model, backend="llmc")`: the TorchDynamo backend (`backend`) and the runner
of kernel plans on torch tensors (`runner`)."""
