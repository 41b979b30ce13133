#!/bin/sh
# r1fleet probe: print this host's probe document on stdout (see DESIGN.md "Probe document").
#
# Usage: sh probe.sh [MODEL_DIR]      (MODEL_DIR defaults to /var/lib/r1fleet/models)
#
# Each section is a line "#### r1fleet:<section>" followed by the raw output of one command.
# A section whose tool is missing stays present but empty. The script never fails as a whole:
# the parser (r1fleet/hardware/) decides what a missing section means.
#
# POSIX sh only (runs under dash, busybox sh and macOS sh): no bash-isms, no Python.
# Tools are called by name through PATH so that lab stand-ins on PATH are found first.

MODEL_DIR=${1:-/var/lib/r1fleet/models}
LC_ALL=C
export LC_ALL
# Append (never prepend) the sbin directories: lspci and mokutil live there on some distros,
# and anything earlier on PATH (such as a lab stand-in) must keep precedence.
PATH="${PATH:-/usr/bin:/bin}:/usr/sbin:/sbin"
export PATH

OS=$(uname -s 2>/dev/null)

has() {
    command -v "$1" >/dev/null 2>&1
}

section() {
    printf '#### r1fleet:%s\n' "$1"
}

# A hung driver can make nvidia-smi block for minutes; bound each GPU tool call when we can.
bounded() {
    if has timeout; then
        timeout 30 "$@"
    else
        "$@"
    fi
}

# Print a command's stdout only when it succeeded, so that an error message printed on stdout
# (old nvidia-smi does that) never ends up inside a section.
print_if_ok() {
    _out=$(bounded "$@" 2>/dev/null) || return 1
    [ -n "$_out" ] && printf '%s\n' "$_out"
    return 0
}

section uname
uname -srm 2>/dev/null

section os-release
[ -r /etc/os-release ] && cat /etc/os-release 2>/dev/null

section init
# systemd's own test for a system it runs (sd_booted(3): /run/systemd/system exists), else PID 1's name
if [ -d /run/systemd/system ]; then echo systemd; elif [ -r /proc/1/comm ]; then cat /proc/1/comm 2>/dev/null; fi

section meminfo
[ -r /proc/meminfo ] && cat /proc/meminfo 2>/dev/null

section cpu
if has nproc; then
    nproc 2>/dev/null
else
    getconf _NPROCESSORS_ONLN 2>/dev/null
fi
if [ -r /proc/cpuinfo ]; then
    awk '/^model name/ && !m { print; m = 1 } /^flags/ && !f { print; f = 1 }' /proc/cpuinfo 2>/dev/null
fi

NVIDIA_QUERY=index,name,memory.total,memory.used,memory.free,pci.bus_id,uuid,driver_version
section nvidia-smi-query
if has nvidia-smi; then
    # compute_cap is not a valid field on drivers <= 470: retry without it.
    print_if_ok nvidia-smi --query-gpu="$NVIDIA_QUERY,compute_cap" --format=csv,noheader,nounits ||
        print_if_ok nvidia-smi --query-gpu="$NVIDIA_QUERY" --format=csv,noheader,nounits
fi

section nvidia-smi-apps
if has nvidia-smi; then
    print_if_ok nvidia-smi --query-compute-apps=gpu_uuid,pid,process_name,used_memory --format=csv,noheader,nounits
fi

section own-pids
# The processes of r1fleet's own services (their cgroups, v2 or v1): their GPU memory is r1fleet's to reuse.
if has systemctl; then
    for unit in r1fleet-ollama.service r1fleet-llama-server.service; do
        cg=$(systemctl show -p ControlGroup --value "$unit" 2>/dev/null)
        [ -n "$cg" ] || continue
        for procs in "/sys/fs/cgroup$cg/cgroup.procs" "/sys/fs/cgroup/systemd$cg/cgroup.procs"; do
            [ -r "$procs" ] && cat "$procs" && break
        done
    done
fi

section nvidia-smi
if has nvidia-smi; then
    bounded nvidia-smi 2>/dev/null
fi

section lspci
if has lspci; then
    # -k adds the driver bound to each device ("Kernel driver in use: vfio-pci" for a passthrough GPU)
    lspci -nnk 2>/dev/null
fi

section drm
if [ "$OS" = Linux ]; then
    for card in /sys/class/drm/card*; do
        case ${card##*/} in
            *-*) continue ;;  # connectors such as card0-DP-1
        esac
        dev="$card/device"
        [ -d "$dev" ] || continue
        slot=$(cd -P "$dev" 2>/dev/null && pwd -P)
        line="${card##*/} slot=${slot##*/}"
        for attr in vendor device class mem_info_vram_total mem_info_vram_used mem_info_gtt_total; do
            if [ -r "$dev/$attr" ]; then
                value=$(cat "$dev/$attr" 2>/dev/null)
                [ -n "$value" ] && line="$line $attr=$value"
            fi
        done
        printf '%s\n' "$line"
    done
fi

section rocm-smi
if has rocm-smi; then
    print_if_ok rocm-smi --showproductname --showmeminfo vram --json
elif has amd-smi; then
    # rocm-smi is deprecated in favour of amd-smi; the parser accepts either JSON shape.
    print_if_ok amd-smi static --asic --vram --json
fi

section tegra
if [ -r /etc/nv_tegra_release ]; then
    cat /etc/nv_tegra_release 2>/dev/null
    # The board name tells AGX/NX/Nano apart (their memory bandwidths differ).
    [ -r /proc/device-tree/model ] && { tr -d '\000' </proc/device-tree/model 2>/dev/null; echo; }
fi

section sysctl
if [ "$OS" = Darwin ]; then
    # One key at a time: Intel Macs have no iogpu key, and one unknown key must not hide the others.
    for key in hw.memsize hw.model machdep.cpu.brand_string iogpu.wired_limit_mb; do
        sysctl "$key" 2>/dev/null
    done
fi

section system_profiler
if [ "$OS" = Darwin ] && has system_profiler; then
    system_profiler SPDisplaysDataType -json 2>/dev/null
fi

# The free space of a folder's filesystem: df of the folder, or of its nearest existing parent.
free_space() {
    dir=$1
    while [ ! -e "$dir" ] && [ "$dir" != / ] && [ "$dir" != . ]; do
        dir=$(dirname "$dir")
    done
    df -Pk "$dir" 2>/dev/null
}

section df
free_space "$MODEL_DIR"

# Where r1fleet unpacks its releases (an archive and its tree at once), and the ones installed there.
section df-install
free_space /opt/r1fleet

section releases
ls -1d /opt/r1fleet/ollama/*/.r1fleet-installed-* 2>/dev/null

section models
# Model files already under the model directory (over 100 MiB), so a re-run is not refused for the space
# its own model takes: `ls -ln` prints the size in the fifth column on Linux and macOS alike.
if [ -d "$MODEL_DIR" ]; then
    find "$MODEL_DIR" -type f -size +204800 -exec ls -ln {} + 2>/dev/null
fi

section haproxy
# The distribution's HAProxy (the gateway role installs it): installed and candidate versions, for the lock.
if has apt-cache; then
    LC_ALL=C apt-cache policy haproxy 2>/dev/null
fi

section llama-cpp-packages
# Debian's llama.cpp packages (versions.yaml llama_cpp.debian), as apt has them without fetching its lists: which a
# pool member can install (`r1fleet plan`), and the versions a pool runs (`r1fleet lock` records them).
if has apt-cache; then
    if ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1; then echo "lists: present"; else echo "lists: absent"; fi
    LC_ALL=C apt-cache policy llama.cpp-tools llama.cpp-tools-extra libggml0-backend-rpc libggml0-backend-cuda \
        libggml0-backend-hip libggml0-backend-vulkan 2>/dev/null
fi

section secureboot
if has mokutil; then
    mokutil --sb-state 2>/dev/null
fi

# The GPU driver beyond nvidia-smi: what is loaded, what is on disk for the running kernel, who installed it,
# and which kernel packages the host has and can get (r1fleet/hardware/driver.py reads these sections).
section nvidia-smi-error
# nvidia-smi's own words when it fails ("Failed to initialize NVML: Driver/library version mismatch")
if has nvidia-smi && ! bounded nvidia-smi -L >/dev/null 2>&1; then
    bounded nvidia-smi -L 2>&1 | head -n 5
fi

section nvidia-proc
[ -r /proc/driver/nvidia/version ] && head -n 2 /proc/driver/nvidia/version 2>/dev/null

section nvidia-modinfo
has modinfo && modinfo -F version nvidia 2>/dev/null | head -n 1

section libcuda-owner
if has dpkg; then
    dpkg -S libcuda.so.1 2>/dev/null | head -n 10
elif has rpm; then
    for lib in /usr/lib64/libcuda.so.1 /usr/lib/libcuda.so.1; do
        [ -e "$lib" ] && rpm -qf --queryformat '%{NAME}: '"$lib"'\n' "$lib" 2>/dev/null
    done
fi

section cuda-repo
# NVIDIA's CUDA repository among the apt sources (its packages are named like Ubuntu's and Debian's own)
grep -ls 'developer.download.nvidia.com/compute/cuda/repos' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null | head -n 5

section nvidia-installer
has nvidia-uninstall && command -v nvidia-uninstall

section kernel-packages
if has dpkg-query; then
    echo 'dpkg'
    dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' 'linux-image-*' 'linux-headers-*' 'proxmox-kernel-*' \
        'proxmox-headers-*' 'pve-kernel-*' 'pve-headers-*' 'linux-modules-nvidia-*' 2>/dev/null |
        awk '$1 == "ii" { print $2 }' | head -n 200
elif has rpm; then
    echo 'rpm'
    rpm -q --queryformat 'kernel-core-%{VERSION}-%{RELEASE}.%{ARCH}\n' kernel-core 2>/dev/null | head -n 20
fi

section apt-kernel
# Packages for the running kernel that apt offers: its headers, and Ubuntu's signed NVIDIA modules for it
if has apt-cache; then
    release=$(uname -r)
    printf 'kernel %s\n' "$release"
    {
        for name in "linux-headers-$release" "proxmox-headers-$release" "pve-headers-$release"; do
            apt-cache pkgnames "$name" 2>/dev/null
        done
        apt-cache pkgnames linux-modules-nvidia- 2>/dev/null | grep -F -e "-$release"
    } | head -n 50
fi

section dkms-status
has dkms && bounded dkms status 2>/dev/null | head -n 20

section driver-reboot
# r1fleet's record of a reboot it did or left to the user for a driver ("version boot-id"), and this boot's id
[ -r /var/lib/r1fleet/driver-reboot ] && head -n 1 /var/lib/r1fleet/driver-reboot 2>/dev/null
[ -r /proc/sys/kernel/random/boot_id ] && printf 'boot %s\n' "$(cat /proc/sys/kernel/random/boot_id 2>/dev/null)"

section kfd
# AMD: the LLVM target of each GPU node as amdgpu reports it (Ollama reads the same files)
for node in /sys/class/kfd/kfd/topology/nodes/*; do
    [ -r "$node/properties" ] || continue
    printf 'node %s\n' "${node##*/}"
    grep -E '^(gfx_target_version|vendor_id|device_id|location_id|domain) ' "$node/properties" 2>/dev/null
done

exit 0
