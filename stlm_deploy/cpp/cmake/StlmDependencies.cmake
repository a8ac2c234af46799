# Finds what stlm::deploy needs; used by the build (CMakeLists.txt) and by the installed stlmConfig.cmake.
#
#   OpenVINO (Runtime)  : OpenVINO_DIR, else asked from Python (`import openvino` -> <pkg>/cmake, the PyPI
#                         wheel ships headers + CMake config), STLM_PYTHON picks the interpreter.
#   OpenCV core/imgproc/imgcodecs : OpenCVConfig.cmake (libopencv-dev) or, with only the small Debian
#                         packages (libopencv-{core,imgproc,imgcodecs}-dev, which have no CMake config),
#                         imported targets opencv_core/opencv_imgproc/opencv_imgcodecs built from the headers
#                         and libraries found on the system.
#   nlohmann_json       : nlohmann-json3-dev (config, else the header).
#   OpenSSL::Crypto     : libssl-dev (SHA-256 of the artifacts).
include_guard(GLOBAL)

# ---------------------------------------------------------------------------------------------- OpenVINO
if(NOT OpenVINO_DIR AND NOT DEFINED ENV{OpenVINO_DIR})
  if(NOT STLM_PYTHON)
    find_program(STLM_PYTHON NAMES python3 python)
  endif()
  if(STLM_PYTHON)
    execute_process(
      COMMAND "${STLM_PYTHON}" -c "import openvino, pathlib; print(pathlib.Path(openvino.__file__).parent / 'cmake')"
      OUTPUT_VARIABLE _stlm_ov_dir OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _stlm_ov_rc ERROR_QUIET)
    if(_stlm_ov_rc EQUAL 0 AND EXISTS "${_stlm_ov_dir}/OpenVINOConfig.cmake")
      set(OpenVINO_DIR "${_stlm_ov_dir}" CACHE PATH "OpenVINO CMake config directory (from ${STLM_PYTHON})")
    endif()
  endif()
endif()
find_package(OpenVINO QUIET COMPONENTS Runtime)
if(NOT OpenVINO_FOUND)
  message(FATAL_ERROR
    "stlm: OpenVINO not found. Pass -DOpenVINO_DIR=$(python -c \"import openvino, pathlib; "
    "print(pathlib.Path(openvino.__file__).parent / 'cmake')\") (pip install openvino), or -DSTLM_PYTHON=<python "
    "with openvino>, or an OpenVINO archive's runtime/cmake directory.")
endif()

# ------------------------------------------------------------------------------------------------ OpenCV
find_package(OpenCV QUIET COMPONENTS core imgproc imgcodecs)
if(NOT OpenCV_FOUND AND NOT TARGET opencv_core)
  find_path(STLM_OPENCV_INCLUDE_DIR opencv2/core.hpp PATH_SUFFIXES opencv4)
  set(_stlm_cv_missing "")
  if(NOT STLM_OPENCV_INCLUDE_DIR)
    list(APPEND _stlm_cv_missing "opencv2/core.hpp")
  endif()
  foreach(_m core imgproc imgcodecs)
    find_library(STLM_OPENCV_${_m}_LIBRARY NAMES opencv_${_m})
    if(NOT STLM_OPENCV_${_m}_LIBRARY)
      list(APPEND _stlm_cv_missing "libopencv_${_m}")
    endif()
  endforeach()
  if(_stlm_cv_missing)
    message(FATAL_ERROR "stlm: OpenCV not found (missing ${_stlm_cv_missing}): "
                        "apt-get install libopencv-core-dev libopencv-imgproc-dev libopencv-imgcodecs-dev "
                        "(or libopencv-dev), or pass -DOpenCV_DIR=...")
  endif()
  foreach(_m core imgproc imgcodecs)
    add_library(opencv_${_m} UNKNOWN IMPORTED GLOBAL)
    set_target_properties(opencv_${_m} PROPERTIES
      IMPORTED_LOCATION "${STLM_OPENCV_${_m}_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${STLM_OPENCV_INCLUDE_DIR}")
  endforeach()
  set_property(TARGET opencv_imgproc PROPERTY INTERFACE_LINK_LIBRARIES opencv_core)
  set_property(TARGET opencv_imgcodecs PROPERTY INTERFACE_LINK_LIBRARIES opencv_imgproc opencv_core)
  message(STATUS "stlm: OpenCV from ${STLM_OPENCV_INCLUDE_DIR} (no OpenCVConfig.cmake; using the libraries directly)")
endif()

# ---------------------------------------------------------------------------------------- nlohmann_json
find_package(nlohmann_json 3.2 QUIET)
if(NOT TARGET nlohmann_json::nlohmann_json)
  find_path(STLM_NLOHMANN_INCLUDE_DIR nlohmann/json.hpp)
  if(NOT STLM_NLOHMANN_INCLUDE_DIR)
    message(FATAL_ERROR "stlm: nlohmann/json.hpp not found: apt-get install nlohmann-json3-dev")
  endif()
  add_library(nlohmann_json::nlohmann_json INTERFACE IMPORTED GLOBAL)
  set_target_properties(nlohmann_json::nlohmann_json PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES "${STLM_NLOHMANN_INCLUDE_DIR}")
endif()

# ---------------------------------------------------------------------------------------------- OpenSSL
find_package(OpenSSL QUIET COMPONENTS Crypto)
if(NOT TARGET OpenSSL::Crypto)
  message(FATAL_ERROR "stlm: OpenSSL libcrypto not found (SHA-256 of the engine artifacts): apt-get install libssl-dev")
endif()
