#!/usr/bin/env bash
# Install a software Vulkan device (Mesa 25 lavapipe from bookworm-backports) that LiteRT's GPU accelerator
# (WebGPU via Dawn over Vulkan) accepts, without moving the system off Debian 12 (bookworm).
#
#   sudo scripts/install_software_gpu.sh [CACHE_DIR]     # default: ~/.cache/edge-mtp/lavapipe
#   . CACHE_DIR/env.sh                                   # VK_ICD_FILENAMES, XDG_RUNTIME_DIR, LD_LIBRARY_PATH
#
# libvulkan1 (the loader) comes from bookworm through apt. mesa-vulkan-drivers and whatever it needs that the
# installed bookworm packages do not satisfy are downloaded from bookworm-backports with a private apt state
# (own sources list, lists, cache) and unpacked with dpkg -x into CACHE_DIR/root: nothing is installed from
# backports. An ICD json points the loader at the unpacked libvulkan_lvp.so. Idempotent: a second run only
# re-checks the device. Debian's Mesa 22 software rasteriser is not enough: Dawn rejects it.
set -euo pipefail

CACHE="${1:-${EDGE_MTP_LAVAPIPE_DIR:-$HOME/.cache/edge-mtp/lavapipe}}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ARCH="$(dpkg --print-architecture)"
mkdir -p "$CACHE"
CACHE="$(cd "$CACHE" && pwd)"
ROOT="$CACHE/root"
ICD="$CACHE/lvp_icd.json"
ENV_FILE="$CACHE/env.sh"
log() { echo "install_software_gpu: $*" >&2; }

if [ "$(id -u)" != 0 ]; then SUDO=sudo; else SUDO=; fi

# 1. The Vulkan loader from bookworm.
if ! ldconfig -p 2>/dev/null | grep 'libvulkan.so.1 ' >/dev/null; then
  log "installing libvulkan1"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends libvulkan1 >/dev/null
fi

# 2. mesa-vulkan-drivers (+ missing deps) from bookworm-backports, unpacked privately.
LVP="$(find "$ROOT" -name libvulkan_lvp.so -print -quit 2>/dev/null || true)"
if [ -z "$LVP" ]; then
  APT="$CACHE/apt"
  mkdir -p "$APT/lists/partial" "$APT/archives/partial" "$APT/etc/preferences.d" "$APT/etc/apt.conf.d"
  printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s bookworm-backports main\n' \
    "$MIRROR" "$MIRROR" "$MIRROR" > "$APT/sources.list"
  opts=(-o "Dir::Etc::SourceList=$APT/sources.list" -o "Dir::Etc::SourceParts=$APT/etc/none"
        -o "Dir::Etc::Preferences=$APT/etc/none" -o "Dir::Etc::PreferencesParts=$APT/etc/preferences.d"
        -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT" -o "Dir::Cache::archives=$APT/archives"
        -o "Debug::NoLocking=1" -o "APT::Get::List-Cleanup=0" -o "Acquire::Languages=none"
        -o "APT::Sandbox::User=root")
  log "reading bookworm-backports package lists"
  apt-get "${opts[@]}" update -qq
  # Resolve against the real dpkg status: only what the installed system lacks (or has too old) is fetched.
  log "downloading mesa-vulkan-drivers and missing dependencies from bookworm-backports"
  apt-get "${opts[@]}" install -qq -y --download-only --no-install-recommends -t bookworm-backports \
    mesa-vulkan-drivers >/dev/null
  rm -rf "$ROOT.partial" && mkdir -p "$ROOT.partial"
  for deb in "$APT"/archives/*.deb; do
    dpkg -x "$deb" "$ROOT.partial"
  done
  rm -rf "$ROOT" && mv "$ROOT.partial" "$ROOT"
  rm -rf "$APT"  # package lists and .debs: ~60 MB not needed once unpacked
  LVP="$(find "$ROOT" -name libvulkan_lvp.so -print -quit)"
  [ -n "$LVP" ] || { log "mesa-vulkan-drivers has no libvulkan_lvp.so"; exit 1; }
fi

# 3. ICD json + env file.
API="$(sed -n 's/.*"api_version": *"\([^"]*\)".*/\1/p' "$ROOT"/usr/share/vulkan/icd.d/lvp_icd*.json 2>/dev/null || true)"
API="${API%%$'\n'*}"
cat > "$ICD" <<JSON
{
    "ICD": {
        "api_version": "${API:-1.3.0}",
        "library_path": "$LVP"
    },
    "file_format_version": "1.0.0"
}
JSON
LIBDIRS="$(dirname "$LVP")"
mkdir -p "$CACHE/xdg-runtime" && chmod 700 "$CACHE/xdg-runtime"
cat > "$ENV_FILE" <<ENV
# Software Vulkan device (Mesa lavapipe) for LiteRT's GPU accelerator; written by scripts/install_software_gpu.sh
export VK_ICD_FILENAMES="$ICD"
export VK_DRIVER_FILES="$ICD"
export XDG_RUNTIME_DIR="\${XDG_RUNTIME_DIR:-$CACHE/xdg-runtime}"
export LD_LIBRARY_PATH="$LIBDIRS\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
ENV

# 4. Check that the loader finds the device (vulkaninfo is optional; python's ctypes is always there).
# shellcheck disable=SC1090
. "$ENV_FILE"
python3 - <<'PY'
import ctypes, sys
vk = ctypes.CDLL("libvulkan.so.1")
class AppInfo(ctypes.Structure):
    _fields_ = [("sType", ctypes.c_int), ("pNext", ctypes.c_void_p), ("pApplicationName", ctypes.c_char_p),
                ("applicationVersion", ctypes.c_uint32), ("pEngineName", ctypes.c_char_p),
                ("engineVersion", ctypes.c_uint32), ("apiVersion", ctypes.c_uint32)]
class CreateInfo(ctypes.Structure):
    _fields_ = [("sType", ctypes.c_int), ("pNext", ctypes.c_void_p), ("flags", ctypes.c_uint32),
                ("pApplicationInfo", ctypes.c_void_p), ("enabledLayerCount", ctypes.c_uint32),
                ("ppEnabledLayerNames", ctypes.c_void_p), ("enabledExtensionCount", ctypes.c_uint32),
                ("ppEnabledExtensionNames", ctypes.c_void_p)]
class Props(ctypes.Structure):
    _fields_ = [("apiVersion", ctypes.c_uint32), ("driverVersion", ctypes.c_uint32), ("vendorID", ctypes.c_uint32),
                ("deviceID", ctypes.c_uint32), ("deviceType", ctypes.c_int), ("deviceName", ctypes.c_char * 256),
                ("rest", ctypes.c_byte * 1024)]
app = AppInfo(0, None, b"edge-mtp", 1, None, 0, (1 << 22) | (1 << 12))
info = CreateInfo(1, None, 0, ctypes.addressof(app), 0, None, 0, None)
inst = ctypes.c_void_p()
rc = vk.vkCreateInstance(ctypes.byref(info), None, ctypes.byref(inst))
if rc != 0:
    sys.exit(f"install_software_gpu: vkCreateInstance failed ({rc})")
n = ctypes.c_uint32(0)
vk.vkEnumeratePhysicalDevices(inst, ctypes.byref(n), None)
devs = (ctypes.c_void_p * max(n.value, 1))()
vk.vkEnumeratePhysicalDevices(inst, ctypes.byref(n), devs)
names = []
for i in range(n.value):
    p = Props()
    vk.vkGetPhysicalDeviceProperties(ctypes.c_void_p(devs[i]), ctypes.byref(p))
    names.append(f"{p.deviceName.decode()} (Vulkan {p.apiVersion >> 22}.{(p.apiVersion >> 12) & 0x3ff})")
vk.vkDestroyInstance(inst, None)
if not names:
    sys.exit("install_software_gpu: the Vulkan loader found no device")
print("install_software_gpu: Vulkan device: " + ", ".join(names), file=sys.stderr)
PY
echo "$ENV_FILE"
