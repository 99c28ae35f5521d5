"""The TVM backend: TensorIR kernels with hand schedules for CPUs, built with apache-tvm.

Imported only where kernels are built; `import llmc` does not import TVM. TVM's thread pool
reads TVM_NUM_THREADS when it starts; left unset it ran one thread on our 2-core machines, which
halves the bandwidth of every decode kernel. The compiler's process (kernels run in it by
`torch.compile` and the benchmarks) takes the runtime's choice: $LLMC_NUM_THREADS, else every
core, unless the user set TVM_NUM_THREADS (`llmc.runtime.threads`).
"""

import os

from llmc.runtime.threads import default_threads

os.environ.setdefault("TVM_NUM_THREADS", str(default_threads()))
